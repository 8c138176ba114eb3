"""The "QwT* fine-tuning" flags of the three entry scripts (issue 28) and their checks that need no data and no
weights. ``--finetune_epochs 0`` (the default) is QwT as published: no other flag of the group changes anything.
The recipe's defaults were chosen by an ablation on the digits demos (BENCHMARKS.md, QwT*): the paper publishes
none beyond "the QwT modules and the classification head, jointly, one epoch"."""
from utils.core.errors import UserError

LOSSES = ('distill', 'label')
# (dest, default): the recipe's defaults (BENCHMARKS.md, QwT* ablation)
DEFAULTS = dict(finetune_epochs=0, finetune_images=None, finetune_batch_size=32, finetune_lr=1e-3, finetune_wd=0.0,
                finetune_warmup=0, finetune_loss='distill', mixup=0.0, cutmix=0.0,
                smoothing=0.0, checkpoint_every=100)
CHECKPOINT_FILE = 'finetune_checkpoint.pth'


def add_finetune_arguments(p):
    """The argument group on parser ``p``."""
    d = DEFAULTS
    g = p.add_argument_group('QwT* fine-tuning', 'after the closed-form QwT fit, train every block\'s W and b and the '
                             'classification head(s) jointly, all else frozen (the paper\'s QwT*). Off by default.')
    g.add_argument('--finetune_epochs', type=int, default=d['finetune_epochs'], metavar='N',
                   help='epochs of QwT* fine-tuning on the train split (default 0: QwT as published; 1: QwT* as in '
                        'the paper). A rerun of the same command in the same --output_dir resumes from '
                        f'OUTPUT_DIR/{CHECKPOINT_FILE}')
    g.add_argument('--finetune_images', type=int, default=d['finetune_images'], metavar='N',
                   help='cap on the training images of each epoch, over all processes (default: the whole train split)')
    g.add_argument('--finetune_batch_size', type=int, default=d['finetune_batch_size'], metavar='B',
                   help=f"fine-tuning batch per process (default {d['finetune_batch_size']})")
    g.add_argument('--finetune_lr', type=float, default=d['finetune_lr'], metavar='LR',
                   help=f"AdamW peak learning rate, cosine schedule (default {d['finetune_lr']:g})")
    g.add_argument('--finetune_wd', type=float, default=d['finetune_wd'], metavar='WD',
                   help=f"AdamW weight decay (default {d['finetune_wd']:g})")
    g.add_argument('--finetune_warmup', type=int, default=d['finetune_warmup'], metavar='STEPS',
                   help=f"linear warm-up steps of the learning rate (default {d['finetune_warmup']})")
    g.add_argument('--finetune_loss', choices=LOSSES, default=d['finetune_loss'],
                   help="'distill': soft-target cross-entropy against the full-precision model's logits (default); "
                        "'label': cross-entropy on the train labels")
    g.add_argument('--mixup', type=float, default=d['mixup'], metavar='ALPHA',
                   help='timm Mixup alpha while fine-tuning (default 0: off)')
    g.add_argument('--cutmix', type=float, default=d['cutmix'], metavar='ALPHA',
                   help='timm CutMix alpha while fine-tuning (default 0: off)')
    g.add_argument('--smoothing', type=float, default=d['smoothing'], metavar='EPS',
                   help='label smoothing of the label loss (default 0)')
    g.add_argument('--checkpoint_every', type=int, default=d['checkpoint_every'], metavar='STEPS',
                   help=f"write the fine-tuning checkpoint every this many steps, and at the end (default "
                        f"{d['checkpoint_every']})")
    return g


def finetuning(args):
    """Whether this run fine-tunes (QwT*): --finetune_epochs > 0 on a run that quantizes (--eval fp does not)."""
    return getattr(args, 'finetune_epochs', 0) > 0 and args.eval != 'fp'


def check_finetune_args(args):
    """A UserError for the first bad value of the group (no data, no weights needed)."""
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune_epochs {args.finetune_epochs} is negative: use 0 (QwT as published) or 1 (QwT*)")
    if not args.finetune_lr > 0:  # also NaN
        raise UserError(f"--finetune_lr {args.finetune_lr:g} must be > 0: use e.g. {DEFAULTS['finetune_lr']:g}")
    if not args.finetune_wd >= 0:
        raise UserError(f"--finetune_wd {args.finetune_wd:g} must be >= 0")
    for dest in ('finetune_warmup',):
        if getattr(args, dest) < 0:
            raise UserError(f"--{dest} {getattr(args, dest)} must be >= 0")
    for dest in ('finetune_images', 'finetune_batch_size', 'checkpoint_every'):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            raise UserError(f"--{dest} {getattr(args, dest)} must be >= 1")
    for dest in ('mixup', 'cutmix'):
        if not getattr(args, dest) >= 0:
            raise UserError(f"--{dest} {getattr(args, dest):g} must be >= 0 (0 is off)")
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing {args.smoothing:g} must be in [0, 1)")
    if args.finetune_epochs and args.finetune_loss == 'distill' and args.smoothing:
        raise UserError("--smoothing smooths labels: it needs --finetune_loss label (the distill loss has the FP "
                        "model's soft targets)")
