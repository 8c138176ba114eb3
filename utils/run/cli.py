"""Command line of both entry scripts. Parsing and every check that needs no data and no weights run
before torch is imported, so a usage error answers at once."""
import argparse
import os
import sys
import warnings

from models.registry import DIGITS_MODELS, resolve_model, table_names
from utils.run.demo import demo_defaults
from utils.run import ptq as ptq_methods
from utils.run.finetune_flags import add_finetune_arguments, check_finetune_args  # QwT*
from utils.run.naming import FAMILY_METHODS, FAMILY_SCRIPTS, output_folder
from utils.core.cpu_numerics import pin_cpu_numerics
from utils.core.environment import DIST_TIMEOUT_S, cpus_per_process, env_int, quiet_cpp_logs
from utils.core.errors import UserError, one_line

EVAL_CHOICES = ('both', 'ptq', 'repq', 'qwt', 'none', 'fp', 'all')  # 'repq': the older name of 'ptq'
SOLVER_CHOICES = ('inverse', 'lstsq')      # quant.regression.SOLVERS
ACCUMULATE_CHOICES = ('concat', 'normal')  # quant.qwt.ACCUMULATE
# Third-party warnings that runs would print, all harmless: timm 0.4.12's two on current torch (timm's own code),
KNOWN_WARNINGS = ((FutureWarning, r'`torch\.jit\.script` is deprecated'),
                  (UserWarning, r'torch\.meshgrid: in an upcoming release, it will be required to pass the indexing'),
                  # torch's, at every loader iteration, for the published 4 workers on fewer CPUs: the pipeline
                  # says it once, with why the default stays (utils.run.data.workers_note)
                  (UserWarning, r'This DataLoader will create \d+ worker processes in total'),
                  # brevitas's, when the --ptq methods import it, for an optional CUDA kernel of its Hadamard
                  # rotations, which neither brevitas method here uses
                  (UserWarning, r'fast_hadamard_transform package not found, using standard pytorch kernels'))
DEFAULT_BITS = 4
# (option, choices with the default first, help): choices beyond the published procedure; the defaults give
# the published results
BEYOND_PUBLISHED = (
    ('--qwt_solver', SOLVER_CHOICES,
     "QwT least squares: 'inverse' = published float32 inverse of [X,1]^T[X,1] (default); 'lstsq' = float64 least "
     "squares, better conditioned"),
    ('--qwt_accumulate', ACCUMULATE_CHOICES,
     "'concat' = the published concatenate-every-token-then-invert (default); 'normal' = normal equations summed "
     "batch by batch on the device and all-reduced across processes: the same fit to float tolerance, faster, "
     "less memory"),
    ('--calib_search', ('vectorized', 'per_channel'),
     "quantizer initialisation: all channels at once (default) or the published one-channel-at-a-time loop; both "
     "give identical parameters"),
)
MODEL_HELP = {'vit': '{names}, or a full timm 0.4.12 ViT/DeiT name', 'swin': '{names}, or a full timm 0.4.12 Swin name',
              'resnet': '{names} (the published weights: --checkpoint, --checkpoint_dir), or resnet_digits (the '
                        "demo's trained digits ResNet, models/digits)"}
# QwT for ResNets is the published ridge inverse only (check_resnet_args refuses the others).
RESNET_PUBLISHED_ONLY = {'--qwt_solver': 'QwT least squares: the published ridge inverse only (the only value)',
                         '--qwt_accumulate': "QwT's images concatenated then inverted, as published (the only value)"}
# ResNet (SPEC §3b): options of the published script, and the one beyond it.
RESNET_KERNEL_SIZE, RESNET_FACTOR = 1, 64
CONV_A_BITS_CHOICES = ('8', 'a_bits')   # quant.percentile_ptq's conv_a_bits: the published 8, or --a_bits
TRAIN_WORKERS = 4   # SPEC §1b: the published loaders' workers; each worker's seed decides its augmentations
EVAL_WORKERS = 8  # at most: the val loader's default is this process's share of the CPUs, up to 8


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that remembers which spelling of each option the user typed, so messages name
    the flag as given (``--w_bit``, not ``--w_bits``). With ``raise_errors`` a usage error is raised as a
    UserError instead of exiting (the table runner checks its cells' flags with this parser)."""

    def __init__(self, *a, raise_errors=False, **k):
        super().__init__(*a, **k)
        self.raise_errors = raise_errors

    def error(self, message):
        """argparse's own errors (an unknown flag, a missing value, a refused choice): one line naming
        --help, which shows the flags, instead of the usage block."""
        self.fail(message if self.raise_errors else f'{message} (python {self.prog} --help lists the flags)')

    def fail(self, message):
        """One line on stderr, ``error: MESSAGE``, and exit 2 (a UserError with ``raise_errors``)."""
        if self.raise_errors:
            raise UserError(message)
        self.exit(2, f'error: {one_line(message)}\n')

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_args(argv, namespace)
        typed = {}
        for action in self._actions:
            for s in action.option_strings:
                if any(a == s or a.startswith(s + '=') for a in argv):
                    typed[action.dest] = s
        parsed._typed, parsed._argv = typed, argv
        return parsed


def flag(args, dest):
    """The option string the user typed for ``dest`` (its first spelling if none was typed)."""
    return getattr(args, '_typed', {}).get(dest, '--' + dest)


def build_parser(family, raise_errors=False):
    method = FAMILY_METHODS[family]
    compensation = 'QwT group-convolution compensation' if family == 'resnet' else 'QwT compensation'
    p = Parser(raise_errors=raise_errors, prog=FAMILY_SCRIPTS[family],
               description=f'{method} post-training quantization, then {compensation}, evaluated on ImageNet.')
    p.add_argument('--model', default=None, help=MODEL_HELP[family].format(names=', '.join(table_names(family))))
    p.add_argument('--data_dir', default=None, help='ImageNet root holding train/<class>/* and val/<class>/*')
    p.add_argument('--w_bit', '--w_bits', dest='w_bits', type=int, default=None,
                   help=f'weight bits, 2 to 8 (default {DEFAULT_BITS})')
    p.add_argument('--a_bit', '--a_bits', dest='a_bits', type=int, default=None,
                   help=f'activation bits, 2 to 8 (default {DEFAULT_BITS})' + (
                       '; as published, the convolutions read 8-bit inputs whatever this says (see --conv_a_bits) '
                       'and fc reads 8 bits, so it changes nothing unless --conv_a_bits a_bits'
                       if family == 'resnet' else ''))
    p.add_argument('--batch_size', type=int, default=32,
                   help='batch size of the calibration, QwT and val loaders (default 32; the calibration batch is one batch)')
    p.add_argument('--num_workers', type=int, default=TRAIN_WORKERS,
                   help=f'workers of the training-split loader (calibration and QwT images; default {TRAIN_WORKERS}, '
                        "as published: each worker's seed decides its images' augmentation, so another value "
                        'gives other augmented pixels)')
    p.add_argument('--eval_workers', type=int, default=None,
                   help=f"workers of the val loader (deterministic; default this process's share of the CPUs it may "
                        f"use, at most {EVAL_WORKERS})")
    p.add_argument('--seed', type=int, default=0, help='seed of python, numpy and torch (default 0)')
    p.add_argument('--start_block', type=int, default=0,
                   help='first block that gets QwT compensation; earlier blocks get zeros (default 0)')
    p.add_argument('--qwt_samples', type=int, default=512,
                   help='training images for QwT over all processes, a multiple of batch_size x processes (default 512)')
    if family == 'resnet':
        from utils.run.weights import PUBLISHED_FOLDER, RESNET_WEIGHTS
        files = ', '.join(w.file for w in RESNET_WEIGHTS.values())
        p.add_argument('--checkpoint', default=None,
                       help=f'local weights (.pth state dict); default: the published file ({files}) in '
                            f'--checkpoint_dir or {PUBLISHED_FOLDER}/; nothing is downloaded')
        p.add_argument('--checkpoint_dir', default=None,
                       help=f'a folder holding the published weights under their file names ({files}); '
                            f'{PUBLISHED_FOLDER}/ of the working folder is looked in after it')
        p.add_argument('--kernel_size', type=int, default=RESNET_KERNEL_SIZE,
                       help=f'kernel of the QwT convolutions, odd (default {RESNET_KERNEL_SIZE}, as published; '
                            'padding kernel_size // 2)')
        p.add_argument('--factor', type=int, default=RESNET_FACTOR,
                       help='input channels per group of the QwT convolutions: groups = max(C_in // factor, 1) '
                            f'(default {RESNET_FACTOR}, as published)')
    else:
        p.add_argument('--checkpoint', default=None,
                       help='local weights (.pth state dict, or timm .npz for vit_*); nothing is downloaded')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='let --checkpoint / --load unpickle arbitrary Python objects (only for files you trust); '
                        'without it only tensors and plain containers are read')
    p.add_argument('--output_dir', default=None, help='where log.txt and result.json go (default output/<model>_w<W>a<A>)')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda if available, else cpu)')
    p.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                   help='set by torch.distributed.launch; LOCAL_RANK from the environment wins')
    p.add_argument('--dist_timeout', type=float, default=DIST_TIMEOUT_S, metavar='SECONDS',
                   help=f'with several processes: how long they wait for each other to form the process group '
                        f'before stopping with an error (default {DIST_TIMEOUT_S} s; rank 0 prints a line while it '
                        'waits)')
    p.add_argument('--save', default=None, metavar='PATH',
                   help='write the quantized and compensated model here as soon as it is fitted (atomic); with '
                        '--finetune_epochs, again once fine-tuned (QwT*)')
    p.add_argument('--load', default=None, metavar='PATH',
                   help='evaluate a model written by --save: no calibration, no QwT, no train/ split needed')
    p.add_argument('--num_val', type=int, default=None, metavar='N',
                   help='evaluate on a fixed subset of N val images (the same for every run), for quick checks')
    p.add_argument('--strict_images', action='store_true',
                   help='stop at the first unreadable image instead of skipping it (timm, and the published runs, '
                        'skip it and use the next image; skipped files are logged and listed in result.json)')
    p.add_argument('--allow_class_subset', action='store_true',
                   help="accept a train/ or val/ whose number of class folders differs from the model's classes "
                        '(labels are folder indices: accuracy is then only meaningful if the folders are the '
                        "model's first classes)")
    p.add_argument('--dump_inputs', default=None, metavar='PATH',
                   help="write the calibration batch and this process's QwT images (and their files) to PATH with "
                        'torch.save after making every draw of the published run up to them, then exit '
                        'without calibrating')
    p.add_argument('--demo', action='store_true', help=demo_help(family))
    # Options beyond the published procedure (defaults are the published behaviour).
    for option, choices, help_text in BEYOND_PUBLISHED:
        if family == 'resnet' and option in RESNET_PUBLISHED_ONLY:  # accepted at its default, refused otherwise
            p.add_argument(option, choices=choices, default=choices[0], metavar=choices[0],
                           help=RESNET_PUBLISHED_ONLY[option])
        else:
            p.add_argument(option, choices=choices, default=choices[0], help=help_text)
    if family == 'resnet':
        p.add_argument('--conv_a_bits', choices=CONV_A_BITS_CHOICES, default=CONV_A_BITS_CHOICES[0],
                       help="input bits of the convolutions after the stem: '8' as published (its quantized conv "
                            "overrides the input bits with 8, so the published W4/A4 and W6/A6 ResNet rows are W4/A8 "
                            "and W6/A8 in effect; default), or 'a_bits': a real --a_bits input")
    methods = [m for m in ptq_methods.METHODS.values() if family in m.families]
    p.add_argument('--ptq', default=None, metavar='METHOD',
                   help='the post-training quantizer QwT follows: '
                        + ', '.join(f"'{m.name}' ({m.label})" for m in methods) + f" (default {ptq_methods.DEFAULTS[family]}, as published; brevitas's are described in the "
                          'README, Other quantizers)')
    p.add_argument('--eval', choices=EVAL_CHOICES, default='both',
                   help=f"val evaluation: 'both' models in one pass after QwT (default), 'ptq' ('repq' is its older "
                        f"name) alone, right after the PTQ method ({method} by default) as published, 'qwt' alone, "
                        "'none', 'fp': the full-precision model only (no calibration), or 'all': the full-precision "
                        "model (a copy kept before calibration), the PTQ model and it + QwT in one pass. The calibration and QwT images are the same in "
                        'every case' + (' (the draws of the published FP and Percentile evaluations before QwT are '
                                        'made whatever this says)' if family == 'resnet' else '') +
                        '; with --finetune_epochs > 0 each choice but fp and none also evaluates the fine-tuned model '
                        '(QwT*); all: FP, PTQ, PTQ + QwT and PTQ + QwT*')
    add_finetune_arguments(p)  # QwT*
    return p


def parse_args(family, argv=None):
    """Parsed, checked flags. Every problem visible without touching data or weights is a one-line
    usage error (exit 2) here, before torch is imported."""
    parser = build_parser(family)
    known = parser.parse_known_args(argv)[0]
    if known.demo:
        parser.set_defaults(**demo_defaults(family, known.model))
        if known.model is None or known.model in DIGITS_MODELS:  # the figures the README quotes
            pin_cpu_numerics()  # before torch is imported (a digits model's name imports it); the log says so
    args = parser.parse_args(argv)
    try:
        check_args(args, family, env_int('WORLD_SIZE', 1))
    except UserError as e:
        parser.fail(str(e))
    return fill_defaults(args, family, variant(args, parser))


# Flags that change what is computed (not only how fast): set to another value than the default, they name
# the default output folder, so that a variant never replaces the default run's result.json.
VARIANT_FLAGS = ('start_block', 'qwt_samples', 'qwt_solver', 'qwt_accumulate', 'kernel_size', 'factor',
                 'conv_a_bits', 'finetune_epochs')


def variant(args, parser):
    """(flag, value) of each VARIANT_FLAGS flag this parser has whose value is not its default."""
    return tuple((dest, getattr(args, dest)) for dest in VARIANT_FLAGS
                 if hasattr(args, dest) and getattr(args, dest) != parser.get_default(dest))


def check_args(args, family, world_size):
    """Raise UserError for the first problem with the flags that needs no data and no weights, for a run
    over ``world_size`` processes. Changes nothing."""
    if args.model is None and args.load is None:
        raise UserError(f"--model is required ({', '.join(table_names(family))}), unless --load PATH or --demo")
    if args.data_dir is None and not args.demo:
        raise UserError("--data_dir is required (ImageNet root with train/ and val/), unless --demo")
    check_ptq(args, family)
    for dest in ('w_bits', 'a_bits'):
        value = getattr(args, dest)
        if value is not None and not 2 <= value <= 8:
            raise UserError(f"{flag(args, dest)} {value} not supported: use 2 to 8")
    for dest in ('batch_size', 'qwt_samples', 'num_val'):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise UserError(f"--{dest} must be positive, got {value}")
    if args.dist_timeout <= 0:
        raise UserError(f"--dist_timeout must be positive (seconds), got {args.dist_timeout:g}")
    for dest in ('num_workers', 'eval_workers', 'start_block'):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            raise UserError(f"--{dest} must be >= 0, got {getattr(args, dest)}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed {args.seed} is outside 0..2^32-1 (numpy's range)")
    if args.output_dir is not None and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file, not a folder: choose another path")
    for dest in ('save', 'dump_inputs'):
        path = getattr(args, dest)
        problem = path is not None and unwritable(path)
        if problem:
            raise UserError(f"--{dest} {path}: {problem}; choose another path (checked now, so that no work is lost)")
    world = world_size
    step = args.batch_size * world  # SPEC §3: qwt_samples // batch // world_size batches per process
    if args.load is None and args.eval != 'fp' and args.qwt_samples % step:
        below, above = args.qwt_samples // step * step, (args.qwt_samples // step + 1) * step
        raise UserError(f"--qwt_samples {args.qwt_samples} is not a multiple of --batch_size {args.batch_size} x "
                        f"{world} process(es) = {step}: use {f'{below} or ' if below else ''}{above}")
    if args.load is not None:
        for dest in ('checkpoint', 'save', 'dump_inputs'):
            if getattr(args, dest) is not None:
                raise UserError(f"--{dest} and --load exclude each other: --load evaluates a model already quantized")
        if args.eval in ('fp', 'all'):
            raise UserError(f"--eval {args.eval} and --load exclude each other: --load holds a quantized model, "
                            "not the full-precision one")
        if not os.path.isfile(args.load):
            raise UserError(f"--load {args.load} not found: pass a file written by --save")
    if args.eval == 'fp' and (args.save or args.dump_inputs):
        raise UserError(f"--eval fp evaluates the full-precision model only: leave out "
                        f"{'--save' if args.save else '--dump_inputs'}")
    check_finetune_args(args)  # QwT*
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        kinds = '.pth or .pth.tar file' if family == 'resnet' else '.pth or .npz file'
        raise UserError(f"--checkpoint {args.checkpoint} not found: pass the path of a local {kinds}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} is not a directory (expected DATA_DIR/train/<class>/* and "
                        "DATA_DIR/val/<class>/*)")
    if family == 'resnet':
        check_resnet_args(args)
    if args.model is not None:  # last: a name outside the table imports timm
        spec = resolve_model(args.model, family)
        if spec.family != family:
            raise UserError(f"--model {args.model} is a {spec.family} model: run it with {FAMILY_SCRIPTS[spec.family]}")
        if family == 'resnet' and not args.demo and args.load is None and spec.timm_name not in DIGITS_MODELS:
            from utils.run.weights import find_weights
            find_weights(spec.timm_name, args.checkpoint, args.checkpoint_dir)


def check_ptq(args, family):
    """--ptq: a known method for this family, its package installed, no other method's flags; a third-party
    model cannot be written by --save (its format holds the project's quantizers) nor come from --load."""
    if args.ptq is None:
        return
    if args.load is not None:
        raise UserError(f"--ptq and --load exclude each other: --load {args.load} holds its own method; leave out "
                        "--ptq")
    method = ptq_methods.check(args.ptq, family)
    ptq_methods.check_flags(method, args)
    if method.fp_model and args.save is not None:
        raise UserError(f"--save writes the project's own quantizers, not {method.label}'s (--ptq {args.ptq}): leave "
                        "out --save")


def check_resnet_args(args):
    """The QwT convolution's flags (SPEC §3b), each a one-line UserError."""
    k = args.kernel_size
    if k < 1 or k % 2 == 0:
        fix = 1 if k < 1 else k + 1
        raise UserError(f"--kernel_size {k} must be odd and >= 1 (padding kernel_size // 2 keeps the block's "
                        f"output size only for odd kernels): use {fix}")
    if args.factor < 1:
        raise UserError(f"--factor {args.factor} must be >= 1 (input channels per QwT group): use {RESNET_FACTOR}, "
                        "as published")
    for dest, published in (('qwt_solver', 'inverse'), ('qwt_accumulate', 'concat')):
        if getattr(args, dest) != published:
            raise UserError(f"--{dest} {getattr(args, dest)}: QwT for ResNets has the published ridge inverse only; "
                            f"leave out --{dest}")
    if args.checkpoint_dir is not None and not os.path.isdir(args.checkpoint_dir):
        raise UserError(f"--checkpoint_dir {args.checkpoint_dir} is not a directory")


def fill_defaults(args, family, variant=()):
    """The defaults that depend on other flags or on the machine: bit widths (unless --load, whose file has
    them), the output folder (--load's is named once the file is read; ``variant`` names it, see
    output_folder) and the val loader's workers. Returns ``args``."""
    if args.eval_workers is None:
        args.eval_workers = min(EVAL_WORKERS, cpus_per_process())
    if args.load is None:
        args.w_bits, args.a_bits = args.w_bits or DEFAULT_BITS, args.a_bits or DEFAULT_BITS
        default = ptq_methods.DEFAULTS[family]
        args.ptq = args.ptq or default
        if args.output_dir is None:
            fp = args.eval == 'fp'
            args.output_dir = output_folder(args.model, None if fp else args.w_bits, args.a_bits, demo=args.demo,
                                            ptq=None if args.ptq == default else args.ptq,
                                            variant=() if fp else variant)
    return args


def unwritable(path):
    """Why a file cannot be written at ``path`` (None if it can): a folder there, or the nearest
    existing parent folder not writable."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return 'is a directory'
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f'{parent} is not a writable folder'
    return None


def quiet_known_warnings():
    """Silence exactly the known warnings above, nothing else."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)


def main(family, argv=None):
    """Entry point of both scripts: flags first (no torch yet), then the run."""
    quiet_known_warnings()
    try:
        quiet_cpp_logs()
        args = parse_args(family, argv)  # a name outside the table (the demo's digits models) imports timm
        from utils.run import pipeline  # imports torch, torchvision and timm
    except RuntimeError as e:
        if 'torchvision::' not in str(e):
            raise
        import torch
        from importlib.metadata import version
        print(f"error: {mismatched_torchvision(e, torch.__version__, version('torchvision'))}", file=sys.stderr)
        sys.exit(2)
    return pipeline.main(family, args)


def mismatched_torchvision(error, torch_version, vision_version):
    """The fix for a torchvision built for another torch (its operators fail to register at import):
    reinstall the pair from the index the installed torch came from (its +cpu / +cuXYZ tag)."""
    tag = torch_version.partition('+')[2]
    index = f' --index-url https://download.pytorch.org/whl/{tag}' if tag else ''
    return (f'torchvision {vision_version} does not fit torch {torch_version} ({error}): install them as a pair '
            f'from one index, e.g. pip install --force-reinstall torch=={torch_version.partition("+")[0]} '
            f'torchvision{index}')


def demo_help(family):
    """--demo's help: what the demo of this script runs."""
    from utils.run.demo import DIGITS_DEMO, RANDOM_DEMO
    d, other = DIGITS_DEMO[family], RANDOM_DEMO[family]['model']
    what = (f"{d['model']}, trained on the UCI handwritten digits (models/digits), at W{d['w_bits']}/A{d['a_bits']}"
            + (f" (conv inputs 8-bit as published) with --factor {d['factor']}" if family == 'resnet' else '')
            + f" on a folder of the digits written at run time: FP, {FAMILY_METHODS[family]} and + QwT top-1 on the "
            "500 held-out digits; one CPU thread and pinned CPU kernels, so the figures are the README's on any x86-64 "
            "CPU. No data set, no download")
    weights = 'random weights' if family == 'resnet' else "timm's pretrained weights if cached, else random"
    return f'{what}. With --model (e.g. {other}): that model with {weights} on a small generated folder'
