"""The README results table: the published FP / RepQ-ViT / QwT top-1 next to this project's result.json files.

    python tools/make_table.py output/                          # every output/**/result.json
    python tools/make_table.py output/table runs/swin_tiny_w4a4/result.json \\
        --only-results --output tables/results --include subset

Prints the Markdown table and writes PREFIX.md, PREFIX.csv and, with matplotlib, PREFIX.png (default
results_table.*). Runs enter by their configuration: one row per model, bit width and variant (the
settings that differ from the published procedure, named in the note; another --ptq method than the paper's
gets its own rows, named in a method column), mean ± sample std over seeds (n); result.json files written
before --ptq (repq_* keys) are read too;
two runs of one row and seed keep the newer result.json, with a warning naming both; --eval fp runs fill
the FP column. Demo, random-weight, val-subset (--num_val), class-subset (--allow_class_subset on a folder
of another number of classes than the model) and --eval none runs are left out unless --include names them.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.core.errors import UserError  # noqa: E402
from utils.run.cli import Parser  # noqa: E402
from utils.table import figures  # noqa: E402
from utils.table import results as table  # noqa: E402
from utils.table.write import write_table  # noqa: E402


def parse_args(argv=None):
    # one-line usage errors, as the entry scripts (utils.run.cli.Parser)
    p = Parser(prog='tools/make_table.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help='result.json files, or folders searched recursively for them')
    p.add_argument('--output', default='results_table', metavar='PREFIX',
                   help='writes PREFIX.md, PREFIX.csv and PREFIX.png')
    p.add_argument('--only-results', action='store_true', help='leave out paper rows without a result')
    p.add_argument('--include', default='', metavar='KINDS',
                   help=f"comma-separated runs to keep that are left out by default: {', '.join(table.CATEGORIES)}, "
                        'or all')
    p.add_argument('--r2', action='store_true', help="also write r2.png (each block's QwT r²) next to every "
                                                     'result.json in the table')
    p.add_argument('--paper', nargs='+', default=list(table.PAPER_CSVS), metavar='CSV',
                   help='the published figures (default: the RepQ-ViT table and the Percentile ResNet rows)')
    return p.parse_args(argv)


def main(argv=None):
    """Build, print and write the table; bad input exits 2 with one line."""
    args = parse_args(argv)
    try:
        include = table.parse_include(args.include)
        results = table.load_results(table.find_results(args.results))
        rows, warnings = table.build_rows(table.load_paper(args.paper), results, args.only_results, include=include)
        for w in warnings:
            print(f'warning: {w}', file=sys.stderr)
        r2 = [r for r in table.select(results, include)[0] if not table.is_fp(r)] if args.r2 else []
        md, written, n_r2 = write_table(rows, args.output, r2)
        if args.r2 and len(written) > 2:
            written.append(f'r2.png next to {n_r2} result.json file(s)')
    except (UserError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(md, end='')
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    if not figures.have_matplotlib():
        print(figures.NO_MATPLOTLIB, file=sys.stderr)


if __name__ == '__main__':
    main()
