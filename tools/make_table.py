"""The README results table: the published RepQ-ViT / QwT top-1 next to this project's result.json files.

    python tools/make_table.py output/                          # every output/**/result.json
    python tools/make_table.py output/deit_small_w4a4 runs/swin_tiny_w4a4/result.json \\
        --only-results --output tables/results

Prints the Markdown table and writes PREFIX.md and PREFIX.csv (default results_table.md / .csv).
Several results for one model and bit width: the last file given wins, with a warning.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils import table  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import write_text_atomic  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help='result.json files, or folders searched recursively for them')
    p.add_argument('--output', default='results_table', metavar='PREFIX', help='writes PREFIX.md and PREFIX.csv')
    p.add_argument('--only-results', action='store_true', help='leave out paper rows without a result')
    p.add_argument('--paper', default=table.PAPER_CSV, metavar='CSV', help='the published figures')
    return p.parse_args(argv)


def main(argv=None):
    """Build, print and write the table; bad input exits 2 with one line."""
    args = parse_args(argv)
    try:
        results = table.load_results(table.find_results(args.results))
        rows, warnings = table.build_rows(table.load_paper(args.paper), results, args.only_results)
        for w in warnings:
            print(f'warning: {w}', file=sys.stderr)
        md = table.to_markdown(rows)
        write_text_atomic(args.output + '.md', md)
        write_text_atomic(args.output + '.csv', table.to_csv(rows))
    except (UserError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(md, end='')
    print(f'wrote {args.output}.md and {args.output}.csv', file=sys.stderr)


if __name__ == '__main__':
    main()
