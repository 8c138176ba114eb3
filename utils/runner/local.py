"""The local backend of tools/reproduce.py: each cell a child process (torchrun over its GPUs when a cell
has several) in one of the launch's slots, GPU groups or CPU slots, at most one cell per slot; Ctrl-C stops
them all. Backends share one interface: ``run(todo, progress) -> {cell: (ok, detail)}`` and
``command_line(cell)``."""
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from utils.core.errors import UserError
from utils.runner.cells import Cell, cell_argv, locked, new_token, record_end, record_interrupted, record_start

PR_SET_PDEATHSIG = 1
POLL_S = 0.2
STOP_GRACE_S = 10.0          # after Ctrl-C: how long children get to stop on SIGINT before SIGKILL
LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                 'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


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
    argv = cell_argv(cell, launch)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    gpus = launch.slots[slot]
    if gpus is not None:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus)
    elif launch.threads:
        env['OMP_NUM_THREADS'] = str(launch.threads)
    return argv, env


def _die_with_parent():
    """In the child, before exec: SIGTERM when this command's process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that no cell outlives the command that runs it (torchrun passes SIGTERM on)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a rerun still finds a live cell by its pid
        pass


def process_start_ticks(pid):
    """The start time of process ``pid`` in clock ticks since boot (/proc), or None: with the pid, it tells
    a live process from a later one that got the same pid."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(record):
    """Whether the process a local cell.json ``record`` names still runs (on this host; a record from another
    host counts as alive: it cannot be checked from here)."""
    if record.get('host') != socket.gethostname():
        return bool(record.get('pid'))
    ticks = process_start_ticks(record.get('pid'))
    return ticks is not None and ticks == record.get('pid_start')


def start(cell, launch, slot):
    """Start ``cell`` in a process group of its own (Ctrl-C reaches only this process; it stops them)."""
    argv, env = command(cell, launch, slot)
    os.makedirs(cell.folder, exist_ok=True)
    console = open(cell.console_path, 'a')
    console.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
    console.flush()
    proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    with locked(cell):  # a token too: a cancelled SLURM job of this cell still ending leaves this record alone
        record_start(cell, launch, shlex.join(argv), pid=proc.pid, pid_start=process_start_ticks(proc.pid),
                     host=socket.gethostname(), token=new_token())
    return Job(cell, slot, proc, time.monotonic(), time.time(), console)


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
    try:
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
            record_interrupted(job.cell)
    finally:  # whatever fails above, Ctrl-C works again for the caller
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class LocalBackend:
    """Cells as child processes of this command, over the launch's slots."""
    wait = True
    interrupted_line = 'stopped: finished cells are kept; run the same command again to resume'

    def __init__(self, launch):
        self.launch = launch

    def command_line(self, cell):
        return shlex.join(command(cell, self.launch, 0)[0])

    alive = staticmethod(pid_alive)

    def check_running(self, running):
        """A cell that another tools/reproduce.py still runs is never started twice: refused in one line."""
        if running:
            cell, record = running[0]
            raise UserError(f"{cell.label} is running in another tools/reproduce.py (pid {record.get('pid')} on "
                            f"{record.get('host')}, since {record.get('started')}): wait for it to end, or stop it, "
                            'then run this command again')

    def _where(self, slot):
        gpus = self.launch.slots[slot]
        return f"GPU {','.join(gpus)}" if gpus else f'CPU slot {slot + 1}'

    def _end(self, job, returncode):
        job.console.close()
        wall = time.monotonic() - job.start
        ok, detail = record_end(job.cell, self.launch, shlex.join(command(job.cell, self.launch, job.slot)[0]),
                                returncode, wall, job.started_at)
        return ok, detail, wall

    def run(self, todo, progress, waiting=()):
        """Run ``todo`` over the slots; returns {cell: (ok, detail)}. Ctrl-C (KeyboardInterrupt) stops every
        child and is raised again. (``waiting`` is empty here: check_running refused live cells.)"""
        pending, free, running = list(todo), list(range(len(self.launch.slots))), []
        try:
            while pending or running:
                while pending and free:
                    job = start(pending.pop(0), self.launch, free.pop(0))
                    running.append(job)
                    progress.started(job.cell, self._where(job.slot))
                time.sleep(POLL_S)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    free.append(job.slot)
                    free.sort()
                    ok, detail, wall = self._end(job, job.proc.returncode)
                    progress.ended(job.cell, ok, detail, wall, job.proc.returncode, pending, running,
                                   job.cell.console_path)
        except KeyboardInterrupt:
            progress.report(f'interrupted: stopping {len(running)} running cell(s)')
            stop(running)
            raise
        return {c: progress.outcome[c] for c in todo if c in progress.outcome}
