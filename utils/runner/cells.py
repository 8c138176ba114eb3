"""The cells of the table and their records, with no process handling: what a cell runs (``Cell``, the
plan), when a finished cell counts as done (its identity and result.json), and cell.json as a cell starts
and ends. Every backend (local processes, SLURM jobs) keeps its books through these functions.

A cell is done when its folder holds a complete result.json and a cell.json, written after the run
succeeded, that records the same script, flags (all but --output_dir), device and number of processes, and
the result.json's checksum."""
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass

from models.registry import DIGITS_MODELS, resolve_model
from utils.core.errors import UserError
from utils.core.files import read_json, write_text_atomic
from utils.run import cli, ptq as ptq_methods
from utils.run.naming import FAMILY_SCRIPTS, output_folder
from utils.run.weights import PUBLISHED_FOLDER
from utils.runner.flags import _unique, check_extra, check_resnet_extra, checkpoint_file, make_launch, parse_bits
from utils.runner.progress import Cancelled, _duration
from utils.table.results import upgrade

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CELL_FILE = 'cell.json'      # what the cell was run with, and how it ended
LOCK_FILE = '.cell.lock'     # flock'ed around a read-check-write of cell.json (locked)
CONSOLE_FILE = 'console.txt'  # the child's stdout and stderr (log.txt is the run's own log)
CELL_FORMAT = 1


@dataclass(frozen=True)
class Cell:
    model: str             # table name (or the timm name outside the table)
    timm_name: str
    family: str            # 'vit', 'swin' or 'resnet'
    kind: str              # 'quant' (RepQ-ViT and + QwT) or 'fp' (the float model, --eval fp)
    w_bits: int            # None for 'fp'
    a_bits: int
    seed: int
    folder: str            # absolute
    script: str            # absolute path of the entry script
    flags: tuple           # entry-script flags, --output_dir included
    blocked: str = None    # why it cannot start (a missing checkpoint), or None
    ptq: str = None        # the --ptq method of a 'quant' cell (None: the family's default)

    @property
    def method(self):
        """The label of the cell's PTQ method (RepQ-ViT, Percentile, brevitas min-max, ...)."""
        return ptq_methods.label_of(self.ptq, self.family)

    @property
    def other_method(self):
        """The method's label where it is not the family's default (it then names the cell's row), else None."""
        default = ptq_methods.DEFAULTS[self.family]
        return None if self.kind == 'fp' or (self.ptq or default) == default else self.method

    @property
    def bits(self):
        return 'FP' if self.kind == 'fp' else f'W{self.w_bits}/A{self.a_bits}'

    @property
    def label(self):
        method = f' {self.other_method}' if self.other_method else ''
        return f'{self.model} FP' if self.kind == 'fp' else f'{self.model} {self.bits}{method} seed {self.seed}'

    @property
    def result_path(self):
        return os.path.join(self.folder, 'result.json')

    @property
    def cell_path(self):
        return os.path.join(self.folder, CELL_FILE)

    @property
    def console_path(self):
        return os.path.join(self.folder, CONSOLE_FILE)


def plan(args, extra=(), launch=None):
    """The cells of ``args`` (parsed by build_parser), in order: per model its FP cell, then each bit width
    and seed. Every runnable cell's flags are checked with the entry script's own checks now, so that a
    typo fails at once rather than in every cell."""
    launch = launch or make_launch(args)
    bits = _unique(parse_bits(b) for b in args.bits)
    seeds = _unique(args.seeds)
    for s in seeds:
        if not 0 <= s < 2 ** 32:
            raise UserError(f'--seeds {s} is outside 0..2^32-1')
    specs = _unique(resolve_model(m) for m in args.models)
    check_extra(extra, _unique(s.family for s in specs))
    if not os.path.isdir(args.data_dir):
        raise UserError(f'--data_dir {args.data_dir} is not a directory (expected DATA_DIR/train/<class>/* and '
                        'DATA_DIR/val/<class>/*)')
    if args.checkpoint_dir is not None and not os.path.isdir(args.checkpoint_dir):
        raise UserError(f'--checkpoint_dir {args.checkpoint_dir} is not a directory')
    if args.script is not None and not os.path.isfile(args.script):
        raise UserError(f'--script {args.script} not found')
    check_resnet_extra(extra, specs)  # last: it builds each ResNet on the meta device
    cells = [cell for spec in specs for cell in _cells_of_model(spec, args, bits, seeds, extra, launch)]
    return cells, launch


def _cells_of_model(spec, args, bits, seeds, extra, launch):
    """One model's cells: its FP cell, then each bit width and seed; blocked where its checkpoint is missing."""
    script = os.path.abspath(args.script) if args.script else os.path.join(ROOT, FAMILY_SCRIPTS[spec.family])
    out = os.path.abspath(args.output_dir)
    common, blocked = ['--model', spec.name, '--data_dir', os.path.abspath(args.data_dir)], None
    folder = args.checkpoint_dir
    if spec.timm_name in DIGITS_MODELS:  # their weights ship with the repository; the entry scripts load them
        folder = None
    elif folder is None and spec.family == 'resnet':  # never downloaded: where the published script looks
        folder = os.path.join(os.getcwd(), PUBLISHED_FOLDER)
    if folder is not None:
        name, url = checkpoint_file(spec.timm_name)
        path = os.path.join(os.path.abspath(folder), name)
        common += ['--checkpoint', path]
        if not os.path.isfile(path):
            blocked = f"{spec.name}: no {name} in {folder}" + (f' (download {url})' if url else '')
    variants = [('fp', None, None, 0, None, output_folder(spec.name, parent=out), ['--eval', 'fp'])]
    for name in methods_of(args.ptq, spec.family):  # the default method's cells keep their flags and folders
        ptq = ['--ptq', name] if name != ptq_methods.DEFAULTS[spec.family] else []
        variants += [('quant', w, a, s, name, output_folder(spec.name, w, a, seed=s, parent=out, ptq=name if ptq else None),
                      ['--w_bit', str(w), '--a_bit', str(a), '--seed', str(s), '--eval', 'both', *ptq])
                     for w, a in bits for s in seeds]
    cells = []
    for kind, w, a, seed, name, folder, own in variants:
        flags = (*extra, *common, *own, '--device', launch.device, '--output_dir', folder)  # the cell's own last: they win
        cell = Cell(spec.name, spec.timm_name, spec.family, kind, w, a, seed, folder, script, flags, blocked, name)
        if not blocked:
            check_cell_flags(cell, launch)
        cells.append(cell)
    return cells


def methods_of(names, family):
    """The --ptq methods of a model of ``family`` for the runner's --ptq ``names`` ('default': the family's own),
    each once; a method that does not apply to the family is a UserError (utils.run.ptq.check)."""
    out = []
    for name in names:
        name = ptq_methods.DEFAULTS[family] if name == 'default' else name
        ptq_methods.check(name, family)
        if name not in out:
            out.append(name)
    return out


def check_cell_flags(cell, launch):
    """The entry script's checks of the cell's flags (no data, no weights), over the launch's processes."""
    parser = cli.build_parser(cell.family, raise_errors=True)
    try:
        cli.check_args(parser.parse_args(list(cell.flags)), cell.family, launch.procs)
    except UserError as e:
        raise UserError(f'{cell.label}: {e}') from None


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
    r = upgrade(r)  # a result.json written before --ptq: repq_* keys, its family's default method
    if cell.kind == 'quant':
        expect['ptq'] = cell.ptq or ptq_methods.DEFAULTS[cell.family]
    for key, value in expect.items():
        if r.get(key) != value:
            return f'result.json has {key} {r.get(key)!r}, expected {value!r}'
    for key in (('fp_top1',) if cell.kind == 'fp' else ('ptq_top1', 'qwt_top1')):
        if not isinstance(r.get(key), (int, float)):
            return f'result.json has no {key}'
    return None


def cell_state(cell, launch, alive=None):
    """('done' | 'running' | 'to run' | 'blocked', detail, the cell.json record or None). 'running': its
    record says queued or running and ``alive(record)`` (the backends' check of its process or job) agrees."""
    record = read_json(cell.cell_path)
    same = isinstance(record, dict) and all(record.get(k) == v for k, v in identity(cell, launch).items())
    status = record.get('status') if same else None
    if status in ('queued', 'running') and alive is not None and alive(record):
        where = f"job {record['job_id']}" if record.get('job_id') else f"pid {record.get('pid')} on {record.get('host')}"
        return 'running', f"{status} since {record.get('submitted') or record.get('started')} ({where})", record
    if status == 'done':
        try:
            intact = _sha256(cell.result_path) == record.get('result_sha256')
        except OSError:
            intact = False
        problem = 'result.json changed since' if not intact else result_problem(cell, read_json(cell.result_path))
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
    if status == 'cancelled':
        job = f"job {record['job_id']}, " if record.get('job_id') else ''
        return 'to run', f"cancelled last time ({job}--cancel at {record.get('cancelled')})", None
    return 'to run', 'interrupted last time', None


# ---- records --------------------------------------------------------------------------------------

def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def read_result(cell):
    """The cell's result.json, or None."""
    return read_json(cell.result_path)


def read_record(cell):
    """The cell's cell.json, or None."""
    record = read_json(cell.cell_path)
    return record if isinstance(record, dict) else None


def new_token():
    """A submission's token, kept in its cell.json and by its job: tokens sort by when they were made (the
    submitting node's clock), so a job can tell a later submission's record from an earlier one."""
    return f'{time.time_ns():020d}-{uuid.uuid4().hex[:8]}'


def superseded(record, token):
    """Whether ``record`` belongs to a later submission than ``token``: its writer (a job that outlived
    --cancel, say) must leave it alone. Records without a token (older ones) supersede nothing."""
    theirs = (record or {}).get('token')
    return token is not None and theirs is not None and theirs > token


@contextlib.contextmanager
def locked(cell):
    """One read-check-write of the cell's cell.json at a time (flock on LOCK_FILE beside it; not reentrant):
    a job, the command that follows it and a new submission may write the same record at once."""
    os.makedirs(cell.folder, exist_ok=True)
    with open(os.path.join(cell.folder, LOCK_FILE), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_record(cell, launch, command_line, **fields):
    """cell.json: the cell's identity, its command, and ``fields`` (status, times, the backend's ids)."""
    write_json(cell.cell_path, {**identity(cell, launch), 'command': command_line, **fields})


def cell_argv(cell, launch):
    """The command of ``cell``: its entry script, or torchrun over the launch's processes per cell."""
    if launch.procs > 1:
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(launch.procs),
                cell.script, *cell.flags]
    return [sys.executable, cell.script, *cell.flags]


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


def _start_fields(started_at):
    """When a run started: ``started`` for people, ``started_at`` (time.time()) for the follower's start line,
    which must carry the run's start, not the moment the submitter noticed it."""
    at = round(started_at, 3)
    return {'started': time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at)), 'started_at': at}


def record_start(cell, launch, command_line, started_at=None, **extra):
    """cell.json as the cell starts (its folder made); ``extra``: the backend's ids (pid, job id, runs)."""
    os.makedirs(cell.folder, exist_ok=True)
    started_at = time.time() if started_at is None else started_at
    write_record(cell, launch, command_line, status='running', **_start_fields(started_at), **extra)


def record_end(cell, launch, command_line, returncode, wall, started_at, token=None, **extra):
    """cell.json once the cell's run has ended with ``returncode`` after ``wall`` seconds (started at
    ``started_at``, time.time()): done if it wrote a complete result.json since, else failed with the
    console's error line, or still cancelled when --cancel marked it so before stopping it (the run then
    ends on SLURM's SIGTERM, which is no failure of its own). Returns (True, the result dict) or (False, why).
    With the ``token`` of its submission, under the record's lock, and not at all where a later submission
    owns the record (then (False, why))."""
    if token is None:
        return _record_end(cell, launch, command_line, returncode, wall, started_at, **extra)
    with locked(cell):
        if superseded(read_record(cell), token):
            return False, 'a later submission of the cell owns its record'
        return _record_end(cell, launch, command_line, returncode, wall, started_at, token=token, **extra)


def _record_end(cell, launch, command_line, returncode, wall, started_at, **extra):
    record = {**identity(cell, launch), 'command': command_line, **extra, **_start_fields(started_at),
              'wall_s': round(wall, 1), 'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'returncode': returncode}
    problem = None if returncode == 0 else last_line(cell.console_path) or f'exit code {returncode}'
    previous = read_record(cell) or {}
    if problem is not None and previous.get('status') == 'cancelled':
        write_json(cell.cell_path, {**record, 'status': 'cancelled', 'cancelled': previous.get('cancelled'),
                                    'last_line': problem})
        return False, Cancelled(f"cancelled (--cancel at {previous.get('cancelled')})")
    if problem is None:
        r = read_json(cell.result_path)
        fresh = os.path.exists(cell.result_path) and os.stat(cell.result_path).st_mtime >= started_at - 1
        problem = result_problem(cell, r) if fresh else 'exited 0 without writing result.json'
    if problem is None:
        write_json(cell.cell_path, {**record, 'status': 'done', 'result_sha256': _sha256(cell.result_path)})
        return True, r
    write_json(cell.cell_path, {**record, 'status': 'failed', 'last_line': problem})
    return False, problem


def record_cancelled(cell, job_id=None):
    """cell.json of a cell that --cancel stops: written before the job is signalled, so that its run, ending on
    the signal, keeps it cancelled (record_end) rather than failed. With ``job_id``: only while the record
    still names that job queued or running. Returns (the record before, the one written), or None."""
    with locked(cell):
        before = read_record(cell) or {}
        if job_id is not None and (before.get('job_id') != job_id or before.get('status') not in ('queued', 'running')):
            return None
        marked = {**before, 'status': 'cancelled', 'cancelled': time.strftime('%Y-%m-%d %H:%M:%S')}
        write_json(cell.cell_path, marked)
    return before, marked


def restore_record(cell, before, marked):
    """Put back ``before`` where cell.json is still ``marked`` (a --cancel whose scancel failed); returns
    whether it did."""
    with locked(cell):
        if read_record(cell) != marked:
            return False
        write_json(cell.cell_path, before)
    return True


def record_interrupted(cell, why=None, seen=None):
    """cell.json of a cell stopped before it ended (it stays not done); ``why`` (a line) for a failure. With
    ``seen`` (the record its caller judged): only where cell.json is still that one. Returns whether it wrote."""
    with locked(cell):
        current = read_record(cell)
        if seen is not None and current != seen:
            return False
        record = {**(current or {}), 'status': 'interrupted' if why is None else 'failed'}
        write_json(cell.cell_path, record if why is None else {**record, 'last_line': why})
    return True
