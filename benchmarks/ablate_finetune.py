"""The ablation behind the QwT* defaults (issue 28; BENCHMARKS.md, QwT*): each digits demo (vit_digits W2/A4,
swin_digits W3/A3, resnet_digits W2/A4) is quantized and compensated once (``--demo --save``), then fine-tuned
from that file for every recipe of the grid (``--load FILE --finetune_epochs 1 ...``, the same images and
teacher as the demo), and its QwT and QwT* top-1 on the 500 held-out digits printed as a Markdown table.

    python benchmarks/ablate_finetune.py [--grid lr|all] [--families vit,swin,resnet]
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.run import cli  # noqa: E402
from utils.run.demo import make_demo_data  # noqa: E402

# (label, flags): one change at a time from the defaults (utils/run/finetune_flags.py)
GRID = {
    'lr': [('lr 1e-5', ['--finetune_lr', '1e-5']), ('lr 3e-4', ['--finetune_lr', '3e-4']),
           ('lr 1e-3', ['--finetune_lr', '1e-3']), ('lr 1e-2', ['--finetune_lr', '1e-2'])],
    'other': [('label loss', ['--finetune_loss', 'label']), ('wd 0.05', ['--finetune_wd', '0.05']),
              ('warm-up 5', ['--finetune_warmup', '5']), ('batch 64', ['--finetune_batch_size', '64']),
              ('mixup 0.8', ['--mixup', '0.8'])],
}


def quiet_main(family, argv):
    """cli.main with its console output swallowed; its result dict."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main(family, argv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--grid', default='all', choices=('lr', 'other', 'all', 'none'))
    p.add_argument('--families', default='vit,swin,resnet')
    p.add_argument('--extra', default='', help='flags added to every fine-tuning run (space-separated)')
    p.add_argument('--only', default='', help='comma-separated recipe labels to run (default: all of the grid)')
    args = p.parse_args(argv)
    grid = {'all': GRID['lr'] + GRID['other'], 'none': [], **GRID}[args.grid]
    recipes = [('defaults' + (f' + {args.extra}' if args.extra else ''), [])] + grid
    if args.only:
        recipes = [r for r in recipes if r[0] in args.only.split(',')]
    families = args.families.split(',')
    rows = {}
    with tempfile.TemporaryDirectory(prefix='ablate_finetune_') as tmp:
        for family in families:
            data = os.path.join(tmp, f'data_{family}')
            make_demo_data(data)
            saved = os.path.join(tmp, f'{family}.pth')
            base = quiet_main(family, ['--demo', '--data_dir', data, '--save', saved, '--eval', 'qwt',
                                       '--output_dir', os.path.join(tmp, f'{family}_qwt')])
            for label, flags in recipes:
                r = quiet_main(family, ['--demo', '--load', saved, '--data_dir', data, '--eval', 'qwt',
                                        '--finetune_epochs', '1', *args.extra.split(), *flags, '--output_dir',
                                        os.path.join(tmp, f"{family}_{label.replace(' ', '_')}")])
                rows.setdefault(label, {})[family] = (base['qwt_top1'], r['qwtstar_top1'], r['finetune']['seconds'])
                print(f"{family} {label}: QwT {base['qwt_top1']:.2f} -> QwT* {r['qwtstar_top1']:.2f} "
                      f"({r['finetune']['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print('| recipe (from the defaults) | ' + ' | '.join(f'{f} QwT → QwT*' for f in families) + ' | mean gain |')
    print('|---|' + '---|' * (len(families) + 1))
    for label, by_family in rows.items():
        cells = [f'{q:.2f} → {s:.2f}' for q, s, _ in (by_family[f] for f in families)]
        gain = sum(s - q for q, s, _ in by_family.values()) / len(by_family)
        print(f'| {label} | ' + ' | '.join(cells) + f' | {gain:+.2f} |')
    return rows


if __name__ == '__main__':
    main()
