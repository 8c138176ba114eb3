"""The whole table in one command (tools/reproduce.py): every cell (model x bits x seed, plus one
full-precision evaluation per model) as a normal run of the family's entry script in a folder of its
own, on every GPU (or CPU slot) at once, resumable, then the table and its figures.

A cell is done when its folder holds a complete result.json and a cell.json, written by this module
after the run succeeded, that records the same script, flags (all but --output_dir), device and number
of processes, and the result.json's checksum. Running the same command again starts only the cells that
are not done. Imports neither torch nor timm unless GPUs must be counted or checkpoint file names looked up.
"""
import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from models.registry import resolve_model
from utils import cli, figures, table
from utils.errors import UserError
from utils.files import write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_FILE = 'cell.json'      # written by this module: what the cell was run with, and how it ended
CONSOLE_FILE = 'console.txt'  # the child's stdout and stderr (log.txt is the run's own log)
CELL_FORMAT = 1
POLL_S = 0.2
STOP_GRACE_S = 10.0          # after Ctrl-C: how long children get to stop on SIGINT before SIGKILL
TABLE_MODELS = tuple(dict.fromkeys(p['model'] for p in table.load_paper()))  # in the table's order
LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                 'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')
# Entry-script flags that this command sets per cell, and what to use instead.
MANAGED = {'model': 'use --models', 'data_dir': 'use --data_dir before --', 'w_bits': 'use --bits',
           'a_bits': 'use --bits', 'seed': 'use --seeds', 'output_dir': 'use --output_dir before --',
           'checkpoint': 'use --checkpoint_dir', 'device': 'use --device (and --gpus) before --',
           'eval': 'every quantized cell runs --eval both, and each model one --eval fp cell',
           'save': 'not for table cells', 'load': 'not for table cells', 'demo': 'not for table cells',
           'dump_inputs': 'not for table cells', 'local_rank': 'set by the launcher'}

EPILOG = """\
examples:
  # the whole table (10 models x W4/A4, W6/A6) on every GPU of the node, one cell per GPU at a time
  python tools/reproduce.py --data_dir /path/to/imagenet --seeds 0 1 2
  # two models, W4/A4 only, on the CPU, two cells at a time, smaller runs (flags after -- go to every run)
  python tools/reproduce.py --models deit_tiny swin_tiny --bits 4 --device cpu --parallel 2 \\
      --data_dir DIR --checkpoint_dir CKPTS -- --qwt_samples 64 --num_val 100

Each cell runs in OUTPUT_DIR/<model>_w<W>a<A>_seed<S>/ (FP: OUTPUT_DIR/<model>_fp/) with its own log.txt,
result.json, console.txt (the child's output) and cell.json. Run the same command again to resume: cells
already done with the same flags are skipped. The table goes to OUTPUT_DIR/results_table.{md,csv,png}.
Exit code: 0 when every cell is done, 1 when some failed or could not start, 2 for a usage error,
130 after Ctrl-C (finished cells are kept).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _raise_user_error(message):
    raise UserError(message)


def build_parser():
    p = _Parser(prog='tools/reproduce.py', formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                usage='%(prog)s --data_dir DIR [options] [-- FLAG ...]',
                description='Run every cell of the QwT table (RepQ-ViT and RepQ-ViT + QwT for each model, bit width\n'
                            'and seed, and the full-precision model once per model), then write the table next to the\n'
                            'published figures (mean ± std over seeds) and its figures.')
    p.add_argument('--data_dir', required=True, help='ImageNet root with train/ and val/')
    p.add_argument('--models', nargs='+', default=list(TABLE_MODELS), metavar='MODEL',
                   help='table names or timm names (default: the 10 table models)')
    p.add_argument('--bits', nargs='+', default=['4', '6'], metavar='BITS',
                   help="bit widths: '4' is W4/A4, '4/8' is W4/A8 (default: 4 6)")
    p.add_argument('--seeds', nargs='+', type=int, default=[0], metavar='SEED', help='seeds (default: 0)')
    p.add_argument('--output_dir', default=os.path.join('output', 'table'),
                   help='folder of the cells and the table (default output/table)')
    p.add_argument('--checkpoint_dir', default=None,
                   help="offline weights, each under timm's file name (e.g. deit_tiny_patch16_224-a1311bcf.pth); "
                        'default: timm downloads them')
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
    return p


# ---- what to run -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    model: str             # table name (or the timm name outside the table)
    timm_name: str
    family: str            # 'vit' or 'swin'
    kind: str              # 'quant' (RepQ-ViT and + QwT) or 'fp' (the float model, --eval fp)
    w_bits: int            # None for 'fp'
    a_bits: int
    seed: int
    folder: str            # absolute
    script: str            # absolute path of the entry script
    flags: tuple           # entry-script flags, --output_dir included
    blocked: str = None    # why it cannot start (a missing checkpoint), or None

    @property
    def bits(self):
        return 'FP' if self.kind == 'fp' else f'W{self.w_bits}/A{self.a_bits}'

    @property
    def label(self):
        return f'{self.model} FP' if self.kind == 'fp' else f'{self.model} {self.bits} seed {self.seed}'

    @property
    def result_path(self):
        return os.path.join(self.folder, 'result.json')

    @property
    def cell_path(self):
        return os.path.join(self.folder, CELL_FILE)

    @property
    def console_path(self):
        return os.path.join(self.folder, CONSOLE_FILE)


@dataclass(frozen=True)
class Launch:
    device: str            # 'cuda' or 'cpu'
    slots: tuple           # per slot: a tuple of GPU ids, or None for a CPU slot
    procs: int = 1         # processes per cell (torchrun when > 1)
    threads: int = None    # OMP_NUM_THREADS of a CPU cell (None: left as it is)

    def describe(self):
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


def check_extra(extra):
    """The flags after '--' must be entry-script flags that this command does not set itself."""
    for family in ('vit', 'swin'):
        parser = cli.build_parser(family)
        parser.error = _raise_user_error
        try:
            ns = parser.parse_args(list(extra))
        except UserError as e:
            raise UserError(f"after --: {e}") from None
        for dest, hint in MANAGED.items():  # typed (even with the default value), or abbreviated to a new value
            if dest in ns._typed or getattr(ns, dest) != parser.get_default(dest):
                raise UserError(f"after --: --{dest} is set by tools/reproduce.py for each cell ({hint})")


def checkpoint_file(timm_name):
    """(file name, url) of timm's pretrained weights of ``timm_name``; '<timm_name>.pth' where timm has no url."""
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
    """The slots cells run in: GPU groups of --gpus_per_run, or --parallel CPU slots."""
    if args.gpus_per_run < 1:
        raise UserError(f'--gpus_per_run must be positive, got {args.gpus_per_run}')
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


def plan(args, extra=(), launch=None):
    """The cells of ``args`` (parsed by build_parser), in order: per model its FP cell, then each bit width
    and seed. Every runnable cell's flags are checked with the entry script's own checks now, so that a
    typo fails at once rather than in every cell."""
    check_extra(extra)
    launch = launch or make_launch(args)
    bits = _unique(parse_bits(b) for b in args.bits)
    seeds = _unique(args.seeds)
    for s in seeds:
        if not 0 <= s < 2 ** 32:
            raise UserError(f'--seeds {s} is outside 0..2^32-1')
    specs = _unique(resolve_model(m) for m in args.models)
    if not os.path.isdir(args.data_dir):
        raise UserError(f'--data_dir {args.data_dir} is not a directory (expected DATA_DIR/train/<class>/* and '
                        'DATA_DIR/val/<class>/*)')
    if args.checkpoint_dir is not None and not os.path.isdir(args.checkpoint_dir):
        raise UserError(f'--checkpoint_dir {args.checkpoint_dir} is not a directory')
    if args.script is not None and not os.path.isfile(args.script):
        raise UserError(f'--script {args.script} not found')
    out = os.path.abspath(args.output_dir)
    data_dir = os.path.abspath(args.data_dir)
    cells = []
    for spec in specs:
        script = os.path.abspath(args.script) if args.script else os.path.join(ROOT, cli.FAMILY_SCRIPTS[spec.family])
        common, blocked = ['--model', spec.name, '--data_dir', data_dir], None
        if args.checkpoint_dir is not None:
            name, url = checkpoint_file(spec.timm_name)
            path = os.path.join(os.path.abspath(args.checkpoint_dir), name)
            common += ['--checkpoint', path]
            if not os.path.isfile(path):
                blocked = f"{spec.name}: no {name} in {args.checkpoint_dir}" + (f' (download {url})' if url else '')
        device = ['--device', launch.device]
        variants = [('fp', None, None, 0, f'{spec.name}_fp', ['--eval', 'fp'])]
        variants += [('quant', w, a, s, f'{spec.name}_w{w}a{a}_seed{s}',
                      ['--w_bit', str(w), '--a_bit', str(a), '--seed', str(s), '--eval', 'both'])
                     for w, a in bits for s in seeds]
        for kind, w, a, seed, folder, own in variants:
            folder = os.path.join(out, folder)
            flags = (*extra, *common, *own, *device, '--output_dir', folder)  # the cell's own flags last: they win
            cell = Cell(spec.name, spec.timm_name, spec.family, kind, w, a, seed, folder, script, flags, blocked)
            if not blocked:
                check_cell_flags(cell, launch)
            cells.append(cell)
    return cells, launch


def check_cell_flags(cell, launch):
    """The entry script's checks of the cell's flags (no data, no weights), with its WORLD_SIZE."""
    parser = cli.build_parser(cell.family)
    parser.error = _raise_user_error
    saved = os.environ.get('WORLD_SIZE')
    os.environ['WORLD_SIZE'] = str(launch.procs)
    try:
        cli.check_args(parser.parse_args(list(cell.flags)), cell.family)
    except UserError as e:
        raise UserError(f'{cell.label}: {e}') from None
    finally:
        if saved is None:
            del os.environ['WORLD_SIZE']
        else:
            os.environ['WORLD_SIZE'] = saved


# ---- done or not -----------------------------------------------------------------------------------

def identity(cell, launch):
    """What must match for a finished cell to count as done: the script, the flags (the output folder
    aside), the device type and the processes per cell."""
    flags, skip = [], False
    for f in cell.flags:
        if skip:
            skip = False
        elif f == '--output_dir':
            skip = True
        else:
            flags.append(f)
    return {'format': CELL_FORMAT, 'script': os.path.basename(cell.script), 'flags': flags,
            'device': launch.device, 'procs': launch.procs}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def result_problem(cell, r):
    """Why ``r`` (a parsed result.json) is not a complete result of ``cell``, or None."""
    if not isinstance(r, dict):
        return 'no readable result.json'
    expect = {'timm_name': cell.timm_name, 'eval': 'fp' if cell.kind == 'fp' else 'both'}
    if cell.kind == 'quant':
        expect.update(w_bits=cell.w_bits, a_bits=cell.a_bits, seed=cell.seed)
    for key, value in expect.items():
        if r.get(key) != value:
            return f'result.json has {key} {r.get(key)!r}, expected {value!r}'
    for key in (('fp_top1',) if cell.kind == 'fp' else ('repq_top1', 'qwt_top1')):
        if not isinstance(r.get(key), (int, float)):
            return f'result.json has no {key}'
    return None


def cell_state(cell, launch):
    """('done' | 'to run' | 'blocked', detail, the cell.json record or None)."""
    record = _read_json(cell.cell_path)
    same = isinstance(record, dict) and all(record.get(k) == v for k, v in identity(cell, launch).items())
    status = record.get('status') if same else None
    if status == 'done':
        try:
            intact = _sha256(cell.result_path) == record.get('result_sha256')
        except OSError:
            intact = False
        problem = 'result.json changed since' if not intact else result_problem(cell, _read_json(cell.result_path))
        if problem is None:
            return 'done', f"({_duration(record.get('wall_s'))})", record
    if cell.blocked:
        return 'blocked', cell.blocked, None
    if status == 'done':
        return 'to run', problem, None
    if not isinstance(record, dict):
        return 'to run', '', None
    if not same:
        return 'to run', 'other flags last time', None
    if status == 'failed':
        return 'to run', f"failed last time: {record.get('last_line', '')}", None
    return 'to run', 'interrupted last time', None


# ---- running ---------------------------------------------------------------------------------------

@dataclass
class Job:
    cell: Cell
    slot: int
    proc: subprocess.Popen
    start: float           # time.monotonic()
    started_at: float      # time.time()
    console: object = field(repr=False, default=None)


def command(cell, launch, slot):
    """(argv, env) of ``cell`` on slot ``slot``."""
    if launch.procs > 1:
        argv = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(launch.procs),
                cell.script, *cell.flags]
    else:
        argv = [sys.executable, cell.script, *cell.flags]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    gpus = launch.slots[slot]
    if gpus is not None:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus)
    elif launch.threads:
        env['OMP_NUM_THREADS'] = str(launch.threads)
    return argv, env


def start(cell, launch, slot):
    """Start ``cell`` in a process group of its own (Ctrl-C reaches only this process; it stops them)."""
    os.makedirs(cell.folder, exist_ok=True)
    argv, env = command(cell, launch, slot)
    write_json(cell.cell_path, {**identity(cell, launch), 'status': 'running', 'command': shlex.join(argv),
                                'started': time.strftime('%Y-%m-%d %H:%M:%S')})
    console = open(cell.console_path, 'a')
    console.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
    console.flush()
    proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    return Job(cell, slot, proc, time.monotonic(), time.time(), console)


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def last_line(path, prefer='error:'):
    """The last line of the file starting with ``prefer`` (the entry scripts' one-line errors), else its
    last non-empty line (a traceback's last line); progress bars' carriage returns count as line ends."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    text = text.rsplit('\n==== ', 1)[-1]  # this launch's part
    lines = [ln.strip() for ln in text.replace('\r', '\n').split('\n') if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith(prefer)), lines[-1] if lines else '')


def finish(job, returncode, launch):
    """Record how the cell ended (cell.json); returns (ok, detail)."""
    job.console.close()
    cell, wall = job.cell, round(time.monotonic() - job.start, 1)
    record = {**identity(cell, launch), 'command': shlex.join(command(cell, launch, job.slot)[0]),
              'wall_s': wall, 'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'returncode': returncode}
    problem = None if returncode == 0 else last_line(cell.console_path) or f'exit code {returncode}'
    if problem is None:
        r = _read_json(cell.result_path)
        fresh = os.path.exists(cell.result_path) and os.stat(cell.result_path).st_mtime >= job.started_at - 1
        problem = result_problem(cell, r) if fresh else 'exited 0 without writing result.json'
    if problem is None:
        write_json(cell.cell_path, {**record, 'status': 'done', 'result_sha256': _sha256(cell.result_path)})
        return True, r
    write_json(cell.cell_path, {**record, 'status': 'failed', 'last_line': problem})
    return False, problem


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(jobs, grace=None):
    """Ctrl-C: SIGINT to every child's process group (the runs stop as after Ctrl-C), SIGKILL to whatever
    still runs after ``grace`` seconds (default STOP_GRACE_S); their cells stay not done."""
    grace = STOP_GRACE_S if grace is None else grace
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
    except ValueError:  # not the main thread
        previous = None
    for job in jobs:
        _signal_group(job.proc, signal.SIGINT)
    deadline = time.monotonic() + grace
    for job in jobs:
        try:
            job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for job in jobs:
        _signal_group(job.proc, signal.SIGKILL)  # also loader workers left behind
        job.proc.wait()
        job.console.close()
        record = _read_json(job.cell.cell_path) or {}
        write_json(job.cell.cell_path, {**record, 'status': 'interrupted'})
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def _duration(seconds):
    if seconds is None:
        return ''
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def estimate(remaining, running, timed, n_slots, now=None):
    """(seconds left, rough) from the wall times of finished cells ``timed`` [(cell, seconds)], or None
    before any cell has finished. A cell costs the mean of the finished cells of its model and kind; else
    that of its kind, scaled by how much longer its model's FP cell took than theirs (the FP cell of each
    model runs first); else that of its kind; else that of all cells, and then the figure is only a rough
    lower bound (rough True). The sum is spread over the slots."""
    if not timed:
        return None
    now = time.monotonic() if now is None else now

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def of(model=None, kind=None):
        return mean([s for c, s in timed if model in (None, c.model) and kind in (None, c.kind)])

    overall, rough = of(), False

    def guess(cell):
        nonlocal rough
        g = of(cell.model, cell.kind)
        if g is not None:
            return g
        peers = _unique(c.model for c, _ in timed if c.kind == cell.kind)
        fp_self, fp_peers = of(cell.model, 'fp'), mean([of(m, 'fp') for m in peers])
        if peers and fp_self and fp_peers:
            return of(kind=cell.kind) * fp_self / fp_peers
        g = of(kind=cell.kind)
        if g is None:
            rough = True
            return overall
        return g

    costs = [guess(c) for c in remaining] + [max(0.0, guess(j.cell) - (now - j.start)) for j in running]
    return max(sum(costs) / max(1, n_slots), max(costs, default=0.0)), rough


def _eta_text(est):
    if est is None:
        return ''
    seconds, rough = est
    return f", {'at least ' if rough else 'about '}{_duration(seconds)} left"


class Reporter:
    """Progress lines, with the time of day."""

    def __init__(self, out):
        self.out = out

    def __call__(self, text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)


def _accuracy_text(cell, r):
    if cell.kind == 'fp':
        return f"FP top-1 {r['fp_top1']:.2f}"
    return f"RepQ-ViT {r['repq_top1']:.2f}, + QwT {r['qwt_top1']:.2f}"


def run_cells(todo, launch, report, timed, total, done):
    """Run ``todo`` over the launch's slots; returns {cell: (ok, detail)}. Ctrl-C (KeyboardInterrupt)
    stops every child and is raised again."""
    pending, free, running, outcome = list(todo), list(range(len(launch.slots))), [], {}
    try:
        while pending or running:
            while pending and free:
                slot = free.pop(0)
                cell = pending.pop(0)
                job = start(cell, launch, slot)
                running.append(job)
                where = f"GPU {','.join(launch.slots[slot])}" if launch.slots[slot] else f'CPU slot {slot + 1}'
                report(f'start {cell.label} on {where}')
            time.sleep(POLL_S)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                free.append(job.slot)
                free.sort()
                ok, detail = finish(job, rc, launch)
                outcome[job.cell] = (ok, detail)
                wall = time.monotonic() - job.start
                if ok:
                    done += 1
                    timed.append((job.cell, wall))
                failed = sum(not o for o, _ in outcome.values())
                counts = f'{done}/{total} done, {failed} failed, {len(running)} running'
                eta = _eta_text(estimate(pending, running, timed, len(launch.slots))) if pending or running else ''
                if ok:
                    report(f'done {job.cell.label} in {_duration(wall)}: {_accuracy_text(job.cell, detail)} '
                           f'| {counts}{eta}')
                else:
                    report(f'FAILED {job.cell.label} (exit {rc}) after {_duration(wall)}: {detail} '
                           f'[{job.cell.console_path}] | {counts}{eta}')
    except KeyboardInterrupt:
        report(f'interrupted: stopping {len(running)} running cell(s)')
        stop(running)
        raise
    return outcome


# ---- the table -------------------------------------------------------------------------------------

def write_table(cells, launch, output_dir, out):
    """results_table.{md,csv,png} of the done cells, and r2.png of each done quantized cell; the
    expected cells that are not done are marked missing. Returns the Markdown."""
    done = [c for c in cells if cell_state(c, launch)[0] == 'done']
    results = table.load_results([c.result_path for c in done])
    expected = {}
    for c in cells:
        key = (c.timm_name, 'FP') if c.kind == 'fp' else (c.timm_name, c.bits)
        expected.setdefault(key, []).append(c.seed)
    rows, warnings = table.build_rows(table.load_paper(), results, only_results=True, include=table.ALL,
                                      expected=expected)
    for w in warnings:
        print(f'warning: {w}', file=out)
    md = table.to_markdown(rows)
    prefix = os.path.join(output_dir, 'results_table')
    write_text_atomic(prefix + '.md', md)
    write_text_atomic(prefix + '.csv', table.to_csv(rows))
    written = [prefix + '.md', prefix + '.csv']
    if figures.have_matplotlib():
        figures.results_figure(rows, prefix + '.png')
        written.append(prefix + '.png')
        for c, r in zip(done, results):
            png = os.path.join(c.folder, 'r2.png')
            if c.kind == 'quant' and (not os.path.exists(png) or os.path.getmtime(png) < os.path.getmtime(c.result_path)):
                figures.r2_figure(r, png)
        written.append('r2.png in each quantized cell')
    print(md, end='', file=out)
    print(f"wrote {', '.join(written)}", file=out)
    if not figures.have_matplotlib():
        print(figures.NO_MATPLOTLIB, file=out)
    return md


# ---- the command -----------------------------------------------------------------------------------

def print_plan(cells, launch, states, args, extra, timed, out):
    quant = [c for c in cells if c.kind == 'quant']
    models = _unique(c.model for c in cells)
    print(f"plan: {len(models)} model(s) x {len(_unique(c.bits for c in quant))} bit width(s) x "
          f"{len(_unique(c.seed for c in quant))} seed(s) = {len(quant)} quantized cell(s), plus "
          f"{len(cells) - len(quant)} FP cell(s), in {os.path.abspath(args.output_dir)}", file=out)
    print(f"on {launch.describe()}{'; flags for every run: ' + shlex.join(extra) if extra else ''}", file=out)
    width = max(len(c.model) for c in cells)
    for c in cells:
        state, detail, _ = states[c]
        detail = 'no checkpoint' if state == 'blocked' else detail
        where = '' if c.kind == 'fp' else f'seed {c.seed}'
        sep = ' ' if state == 'done' else ': '
        print(f"  {c.model:<{width}}  {c.bits:<6} {where:<8} {state}{sep + detail if detail else ''}", file=out)
    for reason in _unique(c.blocked for c in cells if c.blocked):
        print(f'  blocked: {reason}', file=out)
    counts = {s: sum(states[c][0] == s for c in cells) for s in ('done', 'to run', 'blocked')}
    todo = [c for c in cells if states[c][0] == 'to run']
    est = estimate(todo, [], timed, len(launch.slots))
    eta = (f'; estimate{_eta_text(est)[1:]}' if est else
           '; estimate: once a first cell has finished') if todo else ''
    print(f"{len(cells)} cells: {counts['done']} done, {counts['to run']} to run, {counts['blocked']} blocked{eta}",
          file=out)
    if todo:
        print(f'first command: {shlex.join(command(todo[0], launch, 0)[0])}', file=out)


def main(argv=None, out=None):
    """tools/reproduce.py; returns the exit code."""
    out = out or sys.stdout
    own, extra = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(own)
        cells, launch = plan(args, extra)
        states = {c: cell_state(c, launch) for c in cells}
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    timed = [(c, s[2]['wall_s']) for c, s in states.items() if s[0] == 'done' and s[2].get('wall_s')]
    print_plan(cells, launch, states, args, extra, timed, out)
    if args.dry_run:
        return 0
    todo = [c for c in cells if states[c][0] == 'to run']
    done = sum(s[0] == 'done' for s in states.values())
    report = Reporter(out)
    previous = _terminate_as_interrupt()
    try:
        outcome = run_cells(todo, launch, report, timed, len(cells), done) if todo else {}
    except KeyboardInterrupt:
        print('stopped: finished cells are kept; run the same command again to resume', file=out)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not todo:
        print('nothing to run: every cell that can run is done', file=out)
    write_table(cells, launch, args.output_dir, out)
    failed = [(c, d) for c, (ok, d) in outcome.items() if not ok]
    blocked = [c for c in cells if states[c][0] == 'blocked']
    for c, detail in failed:
        print(f'failed: {c.label}: {detail} (see {c.console_path})', file=out)
    for reason in _unique(c.blocked for c in blocked):
        print(f'not run ({sum(c.blocked == reason for c in blocked)} cells): {reason}', file=out)
    if failed or blocked:
        print(f'{len(failed)} cell(s) failed, {len(blocked)} not run; fix them and run the same command again',
              file=out)
        return 1
    return 0


def _terminate_as_interrupt():
    """SIGTERM (a batch system ending the job) stops the children like Ctrl-C; returns the old handler."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None
