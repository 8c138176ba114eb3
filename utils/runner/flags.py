"""tools/reproduce.py's own flags, the entry-script flags it passes on (after --), and where cells run:
GPU slots or CPU slots. Imports neither torch nor timm unless GPUs must be counted, checkpoint file names
looked up or a ResNet's QwT grouping checked."""
import argparse
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from utils.core.errors import UserError
from utils.run import cli
from utils.table import results as table

# Entry-script flags that this command sets per cell, and what to use instead.
MANAGED = {'model': 'use --models', 'data_dir': 'use --data_dir before --', 'w_bits': 'use --bits',
           'a_bits': 'use --bits', 'seed': 'use --seeds', 'output_dir': 'use --output_dir before --',
           'checkpoint': 'use --checkpoint_dir', 'device': 'use --device (and --gpus) before --',
           'eval': 'every quantized cell runs --eval both, and each model one --eval fp cell',
           'save': 'not for table cells', 'load': 'not for table cells', 'demo': 'not for table cells',
           'dump_inputs': 'not for table cells', 'local_rank': 'set by the launcher', 'ptq': 'use --ptq before --'}

EPILOG = """\
examples:
  # the whole table (10 models x W4/A4, W6/A6) on every GPU of the node, one cell per GPU at a time
  python tools/reproduce.py --data_dir /path/to/imagenet --seeds 0 1 2
  # two models, W4/A4 only, on the CPU, two cells at a time, smaller runs (flags after -- go to every run)
  python tools/reproduce.py --models deit_tiny swin_tiny --bits 4 --device cpu --parallel 2 \\
      --data_dir DIR --checkpoint_dir CKPTS -- --qwt_samples 64 --num_val 100
  # each model behind its own quantizer and behind brevitas min-max: a row per method
  python tools/reproduce.py --data_dir /path/to/imagenet --ptq default brevitas-minmax

Each cell runs in OUTPUT_DIR/<model>_w<W>a<A>[_<ptq>]_seed<S>/ (FP: OUTPUT_DIR/<model>_fp/) with its own log.txt,
result.json, console.txt (the child's output) and cell.json. Run the same command again to resume: cells
already done with the same flags are skipped. The table goes to OUTPUT_DIR/results_table.{md,csv,png}.
Exit code: 0 when every cell is done, 1 when some failed or could not start, 2 for a usage error,
130 after Ctrl-C (finished cells are kept).
"""


BACKENDS = ('local', 'slurm')
DEFAULT_TIME_MIN = 360
SLURM_FLAGS = ('partition', 'time', 'account', 'qos', 'constraint', 'mem', 'cpus_per_task', 'array_parallelism',
               'slurm_opt', 'no_wait', 'cancel')


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def table_models():
    """The table's models, in its order."""
    return _unique(p['model'] for p in table.load_paper())



def build_parser():
    p = _Parser(prog='tools/reproduce.py', formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                usage='%(prog)s --data_dir DIR [options] [-- FLAG ...]',
                description='Run every cell of the QwT table (RepQ-ViT and RepQ-ViT + QwT for each model, bit width\n'
                            'and seed, and the full-precision model once per model), then write the table next to the\n'
                            'published figures (mean ± std over seeds) and its figures.')
    p.add_argument('--data_dir', required=True, help='ImageNet root with train/ and val/')
    p.add_argument('--models', nargs='+', default=table_models(), metavar='MODEL',
                   help='table names or timm names (default: the 13 table models: 10 with RepQ-ViT, ResNet-18/50/101 '
                        'with Percentile)')
    p.add_argument('--bits', nargs='+', default=['4', '6'], metavar='BITS',
                   help="bit widths: '4' is W4/A4, '4/8' is W4/A8 (default: 4 6)")
    p.add_argument('--seeds', nargs='+', type=int, default=[0], metavar='SEED', help='seeds (default: 0)')
    p.add_argument('--ptq', nargs='+', default=['default'], metavar='METHOD',
                   help="the PTQ methods QwT follows, a row per method (the entry scripts' --ptq; 'default': each "
                        "family's own, RepQ-ViT or Percentile; default: default)")
    p.add_argument('--output_dir', default=os.path.join('output', 'table'),
                   help='folder of the cells and the table (default output/table)')
    p.add_argument('--checkpoint_dir', default=None,
                   help="offline weights, each under timm's file name (e.g. deit_tiny_patch16_224-a1311bcf.pth), the "
                        'ResNets under the published names (resnet18_imagenet.pth.tar, resnet50_imagenet.pth.tar, '
                        'resnet101-63fe2227.pth); default: timm downloads the others, the ResNets are looked for in '
                        'pretrained_weights/ of the working folder (never downloaded); the digits models always use '
                        'their committed weights (models/digits)')
    p.add_argument('--gpus', nargs='+', default=None, metavar='ID',
                   help='GPU ids as CUDA_VISIBLE_DEVICES takes them, e.g. 0 1 2 3 or 0,1,2,3 (default: every '
                        'visible GPU); one cell runs on each at a time')
    p.add_argument('--gpus_per_run', type=int, default=1,
                   help='GPUs of one cell; more than 1 runs each cell with torchrun over that many (default 1)')
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                   help='cuda (default) or cpu; with cpu, --parallel cells run at a time')
    p.add_argument('--parallel', type=int, default=None, metavar='N',
                   help='with --device cpu: cells at a time (default 1); each gets cores/N threads')
    p.add_argument('--dry_run', action='store_true', help='print the plan and stop')
    p.add_argument('--script', default=None, metavar='PATH',
                   help='(for testing) run PATH instead of the entry script of each model family; it gets the '
                        "same flags and must write OUTPUT_DIR/result.json")
    p.add_argument('--backend', choices=BACKENDS, default='local',
                   help="local: child processes on this node's GPUs or CPU slots (default); slurm: one SLURM job "
                        'per cell, submitted as a job array through submitit')
    s = p.add_argument_group('SLURM (--backend slurm)')
    s.add_argument('--partition', help='partition of the jobs (default: the cluster\'s default partition)')
    s.add_argument('--time', metavar='TIME',
                   help=f'time limit of one cell: minutes, or [D-]HH:MM[:SS] (default {DEFAULT_TIME_MIN} min); a '
                        'cell that reaches it is requeued and starts again')
    s.add_argument('--account', help='account to charge')
    s.add_argument('--qos', help='quality of service')
    s.add_argument('--constraint', help='node features, as sbatch --constraint takes them')
    s.add_argument('--mem', metavar='SIZE', help="memory of one cell's job, e.g. 64G (default: the cluster's)")
    s.add_argument('--cpus_per_task', type=int, metavar='N',
                   help="CPUs of one cell's job (default: the cluster's); on --device cpu also its OMP_NUM_THREADS")
    s.add_argument('--array_parallelism', type=int, metavar='N',
                   help='at most N cells running at once (default: as many as the cluster gives)')
    s.add_argument('--slurm_opt', action='append', default=[], metavar='KEY=VALUE',
                   help='any other sbatch option, e.g. --slurm_opt reservation=mine (repeatable)')
    s.add_argument('--no_wait', action='store_true', help='submit and exit; run the same command again to follow '
                                                          'the jobs and write the table')
    s.add_argument('--cancel', action='store_true', help="scancel this plan's queued and running jobs, then exit")
    return p


def parse_time(text):
    """sbatch's time forms in whole minutes: '90', '1:30:00', '2-00:00' (rounded up)."""
    try:
        days, _, clock = text.rpartition('-') if '-' in text else ('0', '', text)
        parts = [int(x) for x in clock.split(':')]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) in (2, 3):
            hours, minutes, seconds = (parts + [0])[:3]
        else:
            raise ValueError
        total = int(days) * 1440 * 60 + hours * 3600 + minutes * 60 + seconds
    except ValueError:
        raise UserError(f'--time {text}: expected minutes or [D-]HH:MM[:SS], e.g. 360 or 6:00:00') from None
    if total <= 0:
        raise UserError(f'--time {text} must be positive')
    return -(-total // 60)


def slurm_options(args, launch):
    """submitit SlurmExecutor parameters of the SLURM flags, all checked now (nothing is submitted before);
    SLURM flags without --backend slurm are refused."""
    given = [f for f in SLURM_FLAGS if getattr(args, f) not in (None, False, [])]
    if args.backend != 'slurm':
        if given:
            raise UserError(f'--{given[0]} is for --backend slurm')
        return None
    options = {'time': DEFAULT_TIME_MIN if args.time is None else parse_time(args.time)}
    for dest in ('partition', 'account', 'qos', 'constraint', 'mem'):
        if getattr(args, dest):
            options[dest] = getattr(args, dest)
    for dest in ('cpus_per_task', 'array_parallelism'):
        value = getattr(args, dest)
        if value is not None:
            if value < 1:
                raise UserError(f'--{dest} must be positive, got {value}')
            options[dest] = value
    if launch.device == 'cuda':
        options['gpus_per_node'] = launch.procs
    extra = {}
    for item in args.slurm_opt:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise UserError(f'--slurm_opt {item}: expected KEY=VALUE, e.g. reservation=mine')
        extra[key.strip().lstrip('-').replace('-', '_')] = value
    if extra:
        options['additional_parameters'] = extra
    return options


@dataclass(frozen=True)
class Launch:
    device: str            # 'cuda' or 'cpu'
    slots: tuple           # per slot: a tuple of GPU ids, or None for a CPU slot
    procs: int = 1         # processes per cell (torchrun when > 1)
    threads: int = None    # OMP_NUM_THREADS of a CPU cell (None: left as it is)
    backend: str = 'local'

    def describe(self):
        if self.backend == 'slurm':
            gpus = f', {self.procs} GPU(s) per cell' + (' (torchrun)' if self.procs > 1 else '') if self.device == 'cuda' else ''
            threads = f', OMP_NUM_THREADS={self.threads}' if self.threads else ''
            return f'SLURM jobs on {self.device}{gpus}{threads}'
        if self.device == 'cpu':
            threads = f', OMP_NUM_THREADS={self.threads}' if self.threads else ''
            return f'{len(self.slots)} CPU slot(s){threads}'
        per = f' ({self.procs} GPUs per cell, torchrun)' if self.procs > 1 else ''
        return f"{len(self.slots)} GPU slot(s){per}: {' | '.join(','.join(s) for s in self.slots)}"


def parse_bits(text):
    """'4' -> (4, 4), '4/8' -> (4, 8)."""
    parts = text.split('/')
    try:
        w, a = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise UserError(f"--bits {text}: expected N (WN/AN) or W/A such as 4/8") from None
    if len(parts) > 2 or not (2 <= w <= 8 and 2 <= a <= 8):
        raise UserError(f"--bits {text}: expected N or W/A with bit widths 2 to 8")
    return w, a


def _unique(items):
    return list(dict.fromkeys(items))


def split_argv(argv):
    """(this command's flags, the flags after '--' for every run)."""
    argv = list(argv)
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def check_extra(extra, families=('vit', 'swin')):
    """The flags after '--' must be flags of every planned family's entry script (``families``) that this
    command does not set itself."""
    for family in families:
        parser = cli.build_parser(family, raise_errors=True)
        try:
            ns = parser.parse_args(list(extra))
        except UserError as e:
            raise UserError(f"after --: {e} (for {cli.FAMILY_SCRIPTS[family]}: plan the models of each script "
                            "separately where their flags differ)") from None
        for dest, hint in MANAGED.items():  # typed (even with the default value), or abbreviated to a new value
            if dest in ns._typed or getattr(ns, dest) != parser.get_default(dest):
                raise UserError(f"after --: --{dest} is set by tools/reproduce.py for each cell ({hint})")


def check_resnet_extra(extra, specs):
    """The ResNet checks of the flags after '--' that need no weights and no data, for every planned ResNet
    (blocked ones too: the grouping does not depend on the weights): the QwT convolution's flags and the
    grouping of --kernel_size / --factor against the model's block channels (utils.run.family, on the meta
    device: imports torch and timm, only where a ResNet is planned)."""
    resnets = [s for s in specs if s.family == 'resnet']
    if not resnets:
        return
    from utils.run.family import check_grouping
    ns = cli.build_parser('resnet', raise_errors=True).parse_args(list(extra))  # check_extra has parsed it
    try:
        cli.check_resnet_args(ns)
        for spec in resnets:
            try:
                check_grouping(spec, ns.kernel_size, ns.factor)
            except UserError as e:
                raise UserError(f'{spec.name}: {e}') from None
    except UserError as e:
        raise UserError(f'after --: {e}') from None


def checkpoint_file(timm_name):
    """(file name, url) of the weights of ``timm_name``: the published file of a ResNet (utils.run.weights), else
    timm's pretrained weights; '<timm_name>.pth' where timm has no url."""
    from utils.run.weights import published_weights
    published = published_weights(timm_name)
    if published is not None:
        return published.file, published.url
    from models.registry import default_cfg  # imports timm
    try:
        url = default_cfg(timm_name).get('url') or ''
    except KeyError:
        url = ''
    return os.path.basename(urlparse(url).path) or f'{timm_name}.pth', url


def visible_gpus():
    """The ids of the GPUs this process sees, as CUDA_VISIBLE_DEVICES names them."""
    import torch
    n = torch.cuda.device_count()
    listed = [g.strip() for g in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if g.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def make_launch(args):
    """The slots cells run in: GPU groups of --gpus_per_run, or --parallel CPU slots; with --backend slurm,
    SLURM's (one slot per cell the array may run at once)."""
    if args.gpus_per_run < 1:
        raise UserError(f'--gpus_per_run must be positive, got {args.gpus_per_run}')
    if getattr(args, 'backend', 'local') == 'slurm':
        return slurm_launch(args)
    if args.device == 'cpu':
        if args.gpus is not None:
            raise UserError('--gpus and --device cpu exclude each other')
        if args.gpus_per_run != 1:
            raise UserError('--gpus_per_run is for GPUs; on the CPU use --parallel N for cells at a time')
        n = 1 if args.parallel is None else args.parallel
        if n < 1:
            raise UserError(f'--parallel must be positive, got {n}')
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        threads = None if 'OMP_NUM_THREADS' in os.environ else max(1, cores // n)
        return Launch('cpu', (None,) * n, 1, threads)
    if args.parallel is not None:
        raise UserError('--parallel is for --device cpu; on GPUs one cell runs on each GPU (--gpus, --gpus_per_run)')
    if args.gpus is not None:
        gpus = [g.strip() for token in args.gpus for g in token.split(',') if g.strip()]
        if len(set(gpus)) != len(gpus):
            raise UserError(f"--gpus {' '.join(args.gpus)}: a GPU is named twice")
    else:
        gpus = visible_gpus()
        if not gpus:
            raise UserError('no GPU visible (torch.cuda.device_count() is 0): pass --device cpu [--parallel N] to '
                            'run on the CPU')
    k = args.gpus_per_run
    if len(gpus) < k:
        raise UserError(f'--gpus_per_run {k} needs at least {k} GPUs; {len(gpus)} given or visible')
    return Launch('cuda', tuple(tuple(gpus[i:i + k]) for i in range(0, len(gpus) - k + 1, k)), k)


def slurm_launch(args):
    """--backend slurm: SLURM chooses the GPUs (--gpus_per_run of one node per cell) and cores."""
    for dest, hint in (('gpus', 'SLURM allocates the GPUs: --gpus_per_run per cell'),
                       ('parallel', 'use --array_parallelism for cells at a time')):
        if getattr(args, dest) is not None:
            raise UserError(f'--{dest} is for --backend local; {hint}')
    if args.device == 'cpu' and args.gpus_per_run != 1:
        raise UserError('--gpus_per_run is for GPUs; on the CPU each cell is one process')
    slots = (None,) * (args.array_parallelism or 1)
    threads = args.cpus_per_task if args.device == 'cpu' else None
    return Launch(args.device, slots, args.gpus_per_run if args.device == 'cuda' else 1, threads, 'slurm')
