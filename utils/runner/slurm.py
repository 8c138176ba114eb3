"""The SLURM backend of tools/reproduce.py, through submitit: every cell to run becomes one job of a job
array (``executor.batch()``), which runs the cell's command (torchrun over its GPUs when it has several) into
its console.txt and keeps its cell.json like the local backend (utils.runner.cells). The jobs do not depend
on the submitting process: it only reads the cells' records and ``squeue``, so Ctrl-C, a closed terminal or
``kill -9`` leave them running, and the same command again waits for them instead of submitting them twice.

A job that SLURM preempts or that reaches its time limit is requeued (submitit's checkpoint: SIGUSR2 before
the end, then ``scontrol requeue``); the cell starts again from the beginning, its cell.json counts the
runs, and the command following it prints a start line for each run.

Each submission of a cell carries a token (cells.new_token) into its job and its cell.json: a job whose
record a later submission has taken over (a rerun right after --cancel, while the cancelled job is still
ending) writes nothing. Every read-check-write of a cell.json holds the record's lock (cells.locked).
submitit is imported only here."""
import contextlib
import io
import logging
import os
import shlex
import socket
import subprocess
import sys
import time

from utils.core.errors import UserError
from utils.runner.cells import (Cancelled, cell_argv, locked, new_token, read_record, read_result, record_cancelled,
                                record_end, record_interrupted, record_start, restore_record, superseded, write_json,
                                write_record)

POLL_S = 2.0
VANISHED_GRACE_S = 5.0   # a job gone from squeue may still be writing its cell.json
INSTALL = ('--backend slurm needs submitit (small, pure Python): pip install submitit, or install '
           'requirements.txt with its lock (README, Install)')


def import_submitit():
    """submitit, with its sacct warnings silenced: without an accounting database every poll of a job's
    state logs one; this backend never asks submitit for states (it reads cell.json and squeue)."""
    try:
        import submitit
    except ImportError:
        raise UserError(INSTALL) from None
    logging.getLogger('submitit').setLevel(logging.ERROR)
    return submitit


def job_id():
    """This job's id as squeue and scancel name it: ARRAYJOB_TASK for a job of an array."""
    array, task = os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID')
    return f'{array}_{task}' if array and task else os.environ.get('SLURM_JOB_ID')


class CellJob:
    """The callable each SLURM job runs (pickled by submitit): the cell's command into its console.txt, and
    its cell.json as it starts and ends. ``checkpoint`` makes it requeue on preemption or time limit."""

    def __init__(self, cell, launch, env, token=None):
        self.cell, self.launch, self.env, self.token = cell, launch, env, token

    def __call__(self):
        cell, argv = self.cell, cell_argv(self.cell, self.launch)
        jid = job_id()
        runs = int(os.environ.get('SLURM_RESTART_COUNT') or 0) + 1  # any requeue: submitit's, scontrol, SLURM's
        extra = {'backend': 'slurm', 'job_id': jid, 'runs': runs, 'host': socket.gethostname()}
        if self.token is not None:
            extra['token'] = self.token
        start, started_at = time.monotonic(), time.time()
        with locked(cell):
            previous = read_record(cell) or {}
            if superseded(previous, self.token):
                return None  # a later submission of this cell owns it
            ours = previous.get('job_id') == jid or (self.token is not None and previous.get('token') == self.token)
            if previous.get('status') == 'cancelled' and ours:
                return None  # --cancel marked it, and this job started before scancel reached it
            record_start(cell, self.launch, shlex.join(argv), started_at=started_at, **extra)
        with open(cell.console_path, 'a') as console:
            console.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} job {jid} run {runs} on {extra['host']}: "
                          f"{shlex.join(argv)}\n")
            console.flush()
            env = {**os.environ, **self.env}
            returncode = subprocess.call(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env)
        record_end(cell, self.launch, shlex.join(argv), returncode, time.monotonic() - start, started_at, **extra)
        return returncode

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on SIGUSR2 (preemption, the time limit near): requeue this same job."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


def squeue_states(job_ids):
    """{job id: SLURM state} of the jobs in ``job_ids`` that SLURM still lists (pending, running, ...)."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(['squeue', '-h', '-r', '-o', '%i %T', '-j', ','.join(sorted(set(job_ids)))],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f'squeue failed ({e}): is this a SLURM login node?') from None
    if p.returncode != 0 and 'Invalid job id' not in p.stderr:
        raise UserError(f"squeue failed: {p.stderr.strip() or p.stdout.strip()}")
    states = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def job_alive(record):
    """Whether the SLURM job of a cell.json ``record`` is still queued or running."""
    return record.get('job_id') in squeue_states([record.get('job_id')])


def cancel(job_ids):
    """scancel the jobs; returns SLURM's complaint, or ''."""
    if not job_ids:
        return ''
    p = subprocess.run(['scancel', *sorted(set(job_ids))], capture_output=True, text=True)
    return p.stderr.strip()


class SlurmBackend:
    """Cells as jobs of a SLURM job array. ``options``: the parameters of submitit's SlurmExecutor
    (partition, time, account, qos, constraint, mem, cpus_per_task, gpus_per_node, array_parallelism,
    additional_parameters); ``folder``: submitit's pickles and the jobs' SLURM logs."""
    interrupted_line = ('stopped following the jobs: they go on in SLURM; run the same command again to follow '
                        'them and write the table (--cancel cancels them)')
    alive = staticmethod(job_alive)

    def __init__(self, launch, options, folder, wait=True):
        self.submitit = import_submitit()
        self.launch, self.options, self.folder, self.wait = launch, options, folder, wait

    def command_line(self, cell):
        return shlex.join(cell_argv(cell, self.launch))

    def check_running(self, running):
        """Cells whose jobs are still queued or running are followed, not submitted again."""

    def cancel(self, running):
        """--cancel: scancel the plan's live jobs; their cells stay not done, recorded as cancelled first, so
        that a job ending on scancel's SIGTERM keeps them so. A job that scancel could not cancel (and that
        SLURM still lists) gets its record back as it was, and the error names it. Returns the line to print."""
        marked = {}  # job id: (cell, record before, record written)
        for cell, record in running:
            change = record_cancelled(cell, record['job_id'])
            if change is not None:  # else it ended meanwhile
                marked[record['job_id']] = (cell, *change)
        complaints = {jid: cancel([jid]) for jid in marked}
        complaints = {jid: c for jid, c in complaints.items() if c}
        listed = squeue_states(list(complaints)) if complaints else {}
        failed = {jid for jid, state in listed.items() if state != 'COMPLETING'}  # the others ended meanwhile
        for jid in sorted(failed):
            restore_record(*marked[jid])
        done = sorted(set(marked) - failed)
        if failed:
            first = complaints[min(failed)].splitlines()[0]
            raise UserError(f"scancel failed for job(s) {' '.join(sorted(failed))} ({first}): their cells are as they "
                            f"were{'; cancelled: ' + ' '.join(done) if done else ''}; run --cancel again, or scancel "
                            "them yourself")
        return f"cancelled {len(done)} job(s){': ' + ' '.join(done) if done else ''}"

    def submit(self, todo):
        """One job array for ``todo``; each cell's cell.json records its job. An sbatch refusal is a
        UserError with SLURM's own message, and nothing is queued (one sbatch call for the whole array)."""
        executor = self.submitit.SlurmExecutor(folder=self.folder, python=sys.executable)
        executor.update_parameters(job_name='qwt-table', **self.options)
        env = {'OMP_NUM_THREADS': str(self.launch.threads)} if self.launch.threads else {}
        jobs, before = [], _submission_files(self.folder)
        tokens = {cell: new_token() for cell in todo}
        try:
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # sbatch's lines: ours, in one
                for cell in todo:
                    jobs.append(executor.submit(CellJob(cell, self.launch, env, tokens[cell])))
        except self.submitit.core.utils.FailedJobError as e:
            _remove_refused(self.folder, before, todo, e)
            lines = [ln.replace('sbatch: error:', '').strip() for ln in str(e).splitlines() if ln.strip()]
            raise UserError(f"sbatch refused the job array: {'; '.join(lines)}") from None
        submitted = time.strftime('%Y-%m-%d %H:%M:%S')
        for cell, job in zip(todo, jobs):
            fields = {'job_id': job.job_id, 'submitted': submitted, 'slurm_log': str(job.paths.stdout)}
            with locked(cell):
                current = read_record(cell) or {}
                if current.get('token') == tokens[cell]:  # the job has started (or ended) already: keep its status
                    write_json(cell.cell_path, {**current, **fields})
                elif not superseded(current, tokens[cell]):
                    write_record(cell, self.launch, self.command_line(cell), status='queued', backend='slurm',
                                 token=tokens[cell], **fields)
        return {cell: job.job_id for cell, job in zip(todo, jobs)}

    def run(self, todo, progress, waiting=()):
        """Submit ``todo``, then (unless --no_wait) follow them and the cells ``waiting`` (queued or running
        from an earlier submission) until each has ended; returns {cell: (ok, detail)}."""
        ids = self.submit(todo) if todo else {}
        if ids:
            first, last = ids[todo[0]], ids[todo[-1]]
            progress.report(f"submitted {len(ids)} cell(s) as SLURM job array {first.split('_')[0]} "
                            f"({first} .. {last}); logs in {self.folder}")
        if not self.wait:
            progress.report('not waiting (--no_wait): run the same command again to follow the jobs and write '
                            'the table')
            return {}
        return follow([*waiting, *todo], progress)


def _submission_files(folder):
    """The names in submitit's folder of files that a submission leaves there when sbatch refuses it: one
    ``<uuid>.pkl`` per job (its pickled callable) and ``.submission_file_<uuid>.sh`` (the sbatch script)."""
    try:
        return {n for n in os.listdir(folder) if n.endswith('.pkl') or n.startswith('.submission_file_')}
    except OSError:
        return set()


def _remove_refused(folder, before, cells, error):
    """Remove what the refused submission of ``cells`` left in ``folder`` (``before``: the names there before
    it): its sbatch script (the command sbatch refused names it) and the pickles of its own jobs, and nothing
    another submission may have put there meanwhile."""
    from submitit.core.utils import DelayedSubmission
    cmd = getattr(error.__cause__, 'cmd', None) or []
    script = os.path.abspath(cmd[-1]) if len(cmd) == 2 and cmd[0] == 'sbatch' else None
    for name in sorted(_submission_files(folder) - before):
        path = os.path.join(folder, name)
        if name.endswith('.pkl'):
            try:
                job = DelayedSubmission.load(path).function
            except Exception:  # not a pickle of ours (another submitter's, being written)
                continue
            ours = isinstance(job, CellJob) and job.cell in cells
        else:
            ours = os.path.abspath(path) == script
        if ours:
            with contextlib.suppress(OSError):
                os.remove(path)


class _Running:
    """A started cell, as the estimate of the time left sees it."""

    def __init__(self, cell, start):
        self.cell, self.start = cell, start


def follow(cells, progress):
    """Report the cells' jobs as they start (each run: a requeued job starts again) and end (from cell.json and
    squeue) until every one has ended; a job that left the queue without ending its cell (scancel, a node
    lost) is recorded as failed."""
    started, runs, ended, gone_since = {}, {}, set(), {}
    while len(ended) < len(cells):
        records = {c: read_record(c) or {} for c in cells if c not in ended}
        alive = squeue_states([r['job_id'] for r in records.values() if r.get('job_id')])
        for cell, r in records.items():
            run = (r.get('token'), r.get('job_id'), r.get('runs', 1), r.get('started_at'))
            if r.get('status') in ('running', 'done', 'failed') and runs.get(cell) != run:
                runs[cell] = run
                at = r.get('started_at')  # the job's own start: this loop may notice it seconds or days later
                started[cell] = time.monotonic() - (max(0.0, time.time() - at) if at else 0.0)
                progress.started(cell, f"{r.get('host', '?')} (job {r.get('job_id')}, run {r.get('runs', 1)})", at=at)
            if r.get('status') in ('done', 'failed'):
                _ended(cell, r, progress, cells, started, ended)
            elif r.get('status') == 'cancelled':  # --cancel from another command: not a failure to record
                _ended(cell, {**r, 'last_line': Cancelled(f"cancelled (--cancel at {r.get('cancelled')})")}, progress,
                       cells, started, ended, ok=False)
            elif r.get('job_id') in alive:
                gone_since.pop(cell, None)
            elif time.monotonic() - gone_since.setdefault(cell, time.monotonic()) >= VANISHED_GRACE_S:
                why = f"job {r.get('job_id')} left the queue without ending the cell (cancelled or killed)"
                if record_interrupted(cell, why, seen=r):  # else its record changed meanwhile: read it again
                    _ended(cell, {**r, 'last_line': why}, progress, cells, started, ended, ok=False)
        if len(ended) < len(cells):
            time.sleep(POLL_S)
    return {c: progress.outcome[c] for c in cells if c in progress.outcome}


def _ended(cell, record, progress, cells, started, ended, ok=None):
    ended.add(cell)
    ok = record.get('status') == 'done' if ok is None else ok
    detail = read_result(cell) if ok else record.get('last_line', '')
    running = [_Running(c, t) for c, t in started.items() if c not in ended]
    pending = [c for c in cells if c not in ended and c not in started]
    log = cell.console_path if record.get('status') in ('done', 'failed') else record.get('slurm_log')
    progress.ended(cell, ok, detail, record.get('wall_s') or 0.0, record.get('returncode'), pending, running, log)
