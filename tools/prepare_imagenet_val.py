"""Sort ImageNet's flat val/ into the 1000 synset folders the scripts expect (train/ already has them).

    python tools/prepare_imagenet_val.py DATA_DIR/val --devkit ILSVRC2012_devkit_t12.tar.gz
    python tools/prepare_imagenet_val.py DATA_DIR/val --kaggle LOC_val_solution.csv

Moves each ILSVRC2012_val_*.JPEG into DATA_DIR/val/<synset>/ (--copy keeps the flat files) and says how
many synset folders val/ then holds: all 1000 are needed for the published accuracy.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.core.errors import UserError  # noqa: E402
from utils.run.imagenet import devkit_labels, kaggle_labels, sort_val  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('val_dir', help='the flat val/ folder')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--devkit', help='ILSVRC2012_devkit_t12.tar.gz, or the folder it unpacks to')
    source.add_argument('--kaggle', help="Kaggle's LOC_val_solution.csv")
    p.add_argument('--copy', action='store_true', help='copy instead of move')
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.val_dir):
            raise UserError(f"{args.val_dir} is not a folder: pass the flat val/ folder")
        labels = devkit_labels(args.devkit) if args.devkit else kaggle_labels(args.kaggle)
        n, classes = sort_val(args.val_dir, labels, args.copy)
    except (UserError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'{n} images sorted; {args.val_dir} holds {classes} synset folders'
          + ('' if classes == 1000 else ' (ImageNet has 1000: the published accuracy needs all of them)'))
    return n, classes


if __name__ == '__main__':
    main()
