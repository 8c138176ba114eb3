"""The SLURM backend's books without a cluster (fakes for squeue and scancel): a cancelled cell stays cancelled,
a followed cell's start line carries the job's own start (one per run of a requeued job), a refused sbatch
leaves none of its files, a job of an earlier submission never writes over a later one's record, and a failed
scancel leaves the records as they were."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from utils.core.errors import UserError
from utils.runner import cells, slurm
from utils.runner.cells import Cell
from utils.runner.progress import Progress, Reporter

LAUNCH = SimpleNamespace(device='cpu', procs=1, threads=1)


def make_cell(tmp_path, seed=0, script='entry.py'):
    folder = str(tmp_path / f'deit_tiny_w4a4_seed{seed}')
    flags = ('--model', 'deit_tiny', '--w_bit', '4', '--a_bit', '4', '--seed', str(seed), '--output_dir', folder)
    return Cell('deit_tiny', 'deit_tiny_patch16_224', 'vit', 'quant', 4, 4, seed, folder, str(tmp_path / script),
                flags)


def read(cell):
    with open(cell.cell_path) as f:
        return json.load(f)


def queued(cell, job_id):
    os.makedirs(cell.folder, exist_ok=True)
    cells.write_record(cell, LAUNCH, 'cmd', status='queued', backend='slurm', job_id=job_id,
                       submitted='2030-01-02 03:04:05')


def write_result(cell, repq=50.0, qwt=55.0):
    with open(cell.result_path, 'w') as f:
        json.dump({'timm_name': cell.timm_name, 'eval': 'both', 'w_bits': 4, 'a_bits': 4, 'seed': cell.seed,
                   'repq_top1': repq, 'qwt_top1': qwt}, f)


# ---- 1. --cancel says cancelled ---------------------------------------------------------------------

def test_a_run_ended_by_cancel_stays_cancelled_and_the_plan_says_so(tmp_path):
    cell = make_cell(tmp_path)
    queued(cell, '77_0')
    cells.record_cancelled(cell)
    when = read(cell)['cancelled']
    with open(cell.console_path, 'w') as f:
        f.write('loading...\nslurmstepd: error: *** JOB 77 CANCELLED ***\n')
    ok, why = cells.record_end(cell, LAUNCH, 'cmd', -15, 3.0, time.time() - 3, job_id='77_0')
    r = read(cell)
    assert (ok, why) == (False, f'cancelled (--cancel at {when})')
    from utils.runner.progress import Cancelled
    assert isinstance(why, Cancelled)  # said as cancelled in the end lines, not as a failure
    assert (r['status'], r['returncode'], r['cancelled'], r['job_id']) == ('cancelled', -15, when, '77_0')
    assert r['last_line'] == 'slurmstepd: error: *** JOB 77 CANCELLED ***'
    assert cells.cell_state(cell, LAUNCH)[:2] == ('to run', f'cancelled last time (job 77_0, --cancel at {when})')


def test_a_cancelled_cell_that_still_finished_is_done_and_a_plain_failure_stays_failed(tmp_path):
    done, failed = make_cell(tmp_path, 0), make_cell(tmp_path, 1)
    for cell in (done, failed):
        queued(cell, f'77_{cell.seed}')
    cells.record_cancelled(done)
    write_result(done)
    assert cells.record_end(done, LAUNCH, 'cmd', 0, 1.0, time.time() - 1)[0] is True
    assert read(done)['status'] == 'done' and cells.cell_state(done, LAUNCH)[0] == 'done'
    ok, why = cells.record_end(failed, LAUNCH, 'cmd', -15, 1.0, time.time() - 1)  # scancel from outside
    assert (ok, why, read(failed)['status']) == (False, 'exit code -15', 'failed')


def test_cancel_marks_the_cells_cancelled_before_scancel(tmp_path, monkeypatch):
    pytest.importorskip('submitit')
    a, b = make_cell(tmp_path, 0), make_cell(tmp_path, 1)
    queued(a, '90_0')
    queued(b, '90_1')
    seen = []

    def fake_scancel(ids):
        seen.append((sorted(ids), read(a)['status'], read(b)['status']))
        return ''
    monkeypatch.setattr(slurm, 'cancel', fake_scancel)
    backend = slurm.SlurmBackend(LAUNCH, {}, str(tmp_path / 'slurm'))
    line = backend.cancel([(a, read(a)), (b, read(b))])
    assert line == 'cancelled 2 job(s): 90_0 90_1'
    assert seen == [(['90_0'], 'cancelled', 'cancelled'), (['90_1'], 'cancelled', 'cancelled')]


def test_a_failed_scancel_leaves_the_records_as_they_were_and_names_the_jobs(tmp_path, monkeypatch):
    """Of three live jobs, scancel cancels 97_0, is refused for 97_1 (SLURM still lists it) and finds 97_2 ended
    meanwhile (no longer listed: not a failure). 97_1's record is back as it was; the error names it."""
    pytest.importorskip('submitit')
    a, b, c = (make_cell(tmp_path, i) for i in range(3))
    for cell in (a, b, c):
        queued(cell, f'97_{cell.seed}')
    before = read(b)
    refusal = 'scancel: error: Kill job error on job id 97_1: Access/permission denied'
    gone = 'scancel: error: Kill job error on job id 97_2: Invalid job id specified'
    monkeypatch.setattr(slurm, 'cancel', lambda ids: {'97_1': refusal, '97_2': gone}.get(ids[0], ''))
    monkeypatch.setattr(slurm, 'squeue_states', lambda ids: {'97_1': 'RUNNING'} if '97_1' in ids else {})
    backend = slurm.SlurmBackend(LAUNCH, {}, str(tmp_path / 'slurm'))
    with pytest.raises(UserError) as e:
        backend.cancel([(cell, read(cell)) for cell in (a, b, c)])
    assert str(e.value) == (f'scancel failed for job(s) 97_1 ({refusal}): their cells are as they were; cancelled: 97_0 '
                            '97_2; run --cancel again, or scancel them yourself')
    assert read(b) == before and cells.cell_state(b, LAUNCH, lambda r: True)[0] == 'running'
    assert read(a)['status'] == 'cancelled' and read(c)['status'] == 'cancelled'


def test_cancel_leaves_a_cell_that_ended_meanwhile_alone(tmp_path):
    """The plan saw the job running; it ended (done) before --cancel marked it: no mark, nothing restored."""
    cell = make_cell(tmp_path)
    cells.write_record(cell, LAUNCH, 'cmd', status='done', job_id='98_0', wall_s=1.0)
    assert cells.record_cancelled(cell, '98_0') is None and read(cell)['status'] == 'done'
    queued(cell, '98_1')  # a record of another job: not this --cancel's
    assert cells.record_cancelled(cell, '98_0') is None and read(cell)['status'] == 'queued'


# ---- a job of an earlier submission ------------------------------------------------------------------------

def test_a_job_outliving_cancel_writes_nothing_over_the_next_submission(tmp_path, monkeypatch):
    """Job 99_0 (token t1) was cancelled and the cell submitted again (job 100_0, token t2, later) before 99_0's
    run had ended: its end leaves the new record as it is, and a requeued start of it runs nothing. The new
    job writes its own."""
    marker = tmp_path / 'ran'
    (tmp_path / 'entry.py').write_text(f'open({str(marker)!r}, "a").write("x")\n')
    cell = make_cell(tmp_path)
    t1 = cells.new_token()
    time.sleep(0.001)
    t2 = cells.new_token()
    assert t1 < t2 and not cells.superseded({'token': t1}, t2) and cells.superseded({'token': t2}, t1)
    assert not cells.superseded({}, t1) and not cells.superseded({'token': t2}, None)
    cells.write_record(cell, LAUNCH, 'cmd', status='queued', job_id='100_0', token=t2)
    new = read(cell)
    with open(cell.console_path, 'w') as f:
        f.write('slurmstepd: error: *** JOB 99 CANCELLED ***\n')
    ok, why = cells.record_end(cell, LAUNCH, 'cmd', 143, 3.0, time.time() - 3, token=t1, job_id='99_0')
    assert (ok, why) == (False, 'a later submission of the cell owns its record') and read(cell) == new
    monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '99')
    monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '0')
    assert slurm.CellJob(cell, LAUNCH, {}, t1)() is None and not marker.exists() and read(cell) == new
    monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '100')
    assert slurm.CellJob(cell, LAUNCH, {}, t2)() == 0 and marker.read_text() == 'x'
    r = read(cell)
    assert (r['job_id'], r['token'], r['status']) == ('100_0', t2, 'failed')  # the entry wrote no result.json


# ---- a requeued job starts again ----------------------------------------------------------------------------

def test_a_requeued_job_gets_a_start_line_for_each_run(tmp_path, monkeypatch, capsys):
    cell = make_cell(tmp_path)
    now = round(time.time(), 3)
    cells.write_record(cell, LAUNCH, 'cmd', status='running', job_id='101_0', host='vm', runs=1, started_at=now - 30)
    polls = []

    def fake_squeue(ids):
        polls.append(1)
        if len(polls) == 2:  # requeued: the same job runs again
            cells.write_record(cell, LAUNCH, 'cmd', status='running', job_id='101_0', host='vm2', runs=2,
                               started_at=now - 5)
        if len(polls) == 3:
            cells.write_record(cell, LAUNCH, 'cmd', status='done', job_id='101_0', host='vm2', runs=2,
                               started_at=now - 5, wall_s=5.0)
            write_result(cell)
        return {'101_0': 'RUNNING'}
    monkeypatch.setattr(slurm, 'squeue_states', fake_squeue)
    monkeypatch.setattr(slurm, 'POLL_S', 0.0)
    slurm.follow([cell], Progress(Reporter(sys.stdout), 1, 0, [], 1))
    lines = capsys.readouterr().out.splitlines()
    stamp = lambda t: time.strftime('%H:%M:%S', time.localtime(t))  # noqa: E731
    assert lines[:2] == [f'[{stamp(now - 30)}] start deit_tiny W4/A4 seed 0 on vm (job 101_0, run 1)',
                         f'[{stamp(now - 5)}] start deit_tiny W4/A4 seed 0 on vm2 (job 101_0, run 2)']
    assert len(lines) == 3 and '] done deit_tiny W4/A4 seed 0 in 5s: ' in lines[2]


def test_a_job_that_starts_after_its_cell_was_cancelled_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / 'ran'
    (tmp_path / 'entry.py').write_text(f'open({str(marker)!r}, "w").close()\n')
    cell = make_cell(tmp_path)
    queued(cell, '91_0')
    cells.record_cancelled(cell)
    monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '91')
    monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '0')
    assert slurm.CellJob(cell, LAUNCH, {})() is None
    assert not marker.exists() and read(cell)['status'] == 'cancelled'
    monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '92')  # a later submission of the same cell does run
    assert slurm.CellJob(cell, LAUNCH, {})() == 0
    assert marker.exists() and read(cell)['job_id'] == '92_0'


def test_follow_ends_a_cell_cancelled_meanwhile_without_recording_a_failure(tmp_path, monkeypatch):
    cell = make_cell(tmp_path)
    queued(cell, '93_0')
    cells.record_cancelled(cell)
    when = read(cell)['cancelled']
    monkeypatch.setattr(slurm, 'squeue_states', lambda ids: {})
    monkeypatch.setattr(slurm, 'POLL_S', 0.0)
    monkeypatch.setattr(slurm, 'VANISHED_GRACE_S', 0.0)
    out = []
    outcome = slurm.follow([cell], Progress(out.append, 1, 0, [], 1))
    assert outcome == {cell: (False, f'cancelled (--cancel at {when})')}
    assert read(cell)['status'] == 'cancelled' and 'last_line' not in read(cell)


# ---- 2. the start line of a followed job carries the job's start ---------------------------------------------

def test_follow_start_lines_carry_the_jobs_start_and_the_estimate_counts_from_it(tmp_path, monkeypatch, capsys):
    """Cell b started 60 s before the follower noticed it, cell a (same model and kind) took 100 s: the start
    lines carry 60 s and 200 s ago, and the time left is 100 - 60 = 40 s (not 100 s from the moment noticed)."""
    a, b = make_cell(tmp_path, 0), make_cell(tmp_path, 1)
    now = round(time.time(), 3)  # whole milliseconds: the record keeps 3 decimals
    cells.write_record(a, LAUNCH, 'cmd', status='done', job_id='94_0', host='vm', runs=1, started_at=now - 200,
                       wall_s=100.0)
    write_result(a)
    cells.write_record(b, LAUNCH, 'cmd', status='running', job_id='94_1', host='vm', runs=1, started_at=now - 60)
    polls = []

    def fake_squeue(ids):
        polls.append(sorted(ids))
        if len(polls) == 2:  # b ends between the polls
            cells.write_record(b, LAUNCH, 'cmd', status='done', job_id='94_1', host='vm', runs=1,
                               started_at=now - 60, wall_s=61.0)
            write_result(b, 51.0, 56.0)
        return {'94_1': 'RUNNING'} if len(polls) == 1 else {}
    monkeypatch.setattr(slurm, 'squeue_states', fake_squeue)
    monkeypatch.setattr(slurm, 'POLL_S', 0.0)
    outcome = slurm.follow([b, a], Progress(Reporter(sys.stdout), 2, 0, [], 1))
    lines = capsys.readouterr().out.splitlines()
    stamp = lambda t: time.strftime('%H:%M:%S', time.localtime(t))  # noqa: E731
    assert lines[0] == f'[{stamp(now - 60)}] start deit_tiny W4/A4 seed 1 on vm (job 94_1, run 1)'
    assert lines[1] == f'[{stamp(now - 200)}] start deit_tiny W4/A4 seed 0 on vm (job 94_0, run 1)'
    head, left = lines[2].rsplit(', about ', 1)
    assert head.endswith('] done deit_tiny W4/A4 seed 0 in 1m40s: RepQ-ViT 50.00, + QwT 55.00 | '
                         '1/2 done, 0 failed, 1 running')
    assert left in ('40s left', '39s left'), left  # 39 on a machine slow enough to take half a second here
    assert lines[3].endswith('] done deit_tiny W4/A4 seed 1 in 1m01s: RepQ-ViT 51.00, + QwT 56.00 | '
                             '2/2 done, 0 failed, 0 running')
    assert len(lines) == 4 and set(outcome) == {a, b} and all(ok for ok, _ in outcome.values())


def test_a_start_on_another_day_carries_its_date(tmp_path, monkeypatch, capsys):
    cell = make_cell(tmp_path)
    at = int(time.time()) - 3 * 86400 + 0.25
    cells.write_record(cell, LAUNCH, 'cmd', status='done', job_id='95_0', host='vm', runs=2, started_at=at,
                       wall_s=5.0)
    write_result(cell)
    monkeypatch.setattr(slurm, 'squeue_states', lambda ids: {})
    slurm.follow([cell], Progress(Reporter(sys.stdout), 1, 0, [], 1))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}] start deit_tiny W4/A4 seed 0 on vm " \
                    '(job 95_0, run 2)'


def test_records_keep_the_start_from_start_to_end(tmp_path):
    cell = make_cell(tmp_path)
    at = int(time.time()) - 30 + 0.25
    cells.record_start(cell, LAUNCH, 'cmd', started_at=at, job_id='96_0')
    r = read(cell)
    assert (r['started_at'], r['started']) == (at, time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at)))
    write_result(cell)
    cells.record_end(cell, LAUNCH, 'cmd', 0, 30.0, at, job_id='96_0')
    assert (read(cell)['status'], read(cell)['started_at'], read(cell)['started']) == ('done', r['started_at'],
                                                                                       r['started'])


# ---- 3. a refused sbatch leaves nothing behind ---------------------------------------------------------------

def test_a_refused_submission_removes_its_own_files_only(tmp_path):
    submitit = pytest.importorskip('submitit')
    folder = tmp_path / 'slurm'
    folder.mkdir()
    ours, other = [make_cell(tmp_path, 0), make_cell(tmp_path, 1)], make_cell(tmp_path, 2)
    old = folder / ('a' * 32 + '.pkl')  # an earlier refused submission of the same cell: not this one's
    submitit.helpers.DelayedSubmission(slurm.CellJob(ours[0], LAUNCH, {})).dump(old)
    before = slurm._submission_files(str(folder))
    for i, cell in enumerate([*ours, other]):  # other: another submitter's job, pickled meanwhile
        submitit.helpers.DelayedSubmission(slurm.CellJob(cell, LAUNCH, {})).dump(folder / f'{i}{"b" * 31}.pkl')
    (folder / ('c' * 32 + '.pkl')).write_bytes(b'half written')
    refused, racing = folder / f'.submission_file_{"d" * 32}.sh', folder / f'.submission_file_{"e" * 32}.sh'
    refused.write_text('#!/bin/bash\n')
    racing.write_text('#!/bin/bash\n')
    error = submitit.core.utils.FailedJobError('sbatch: error: invalid partition specified: nope')
    error.__cause__ = subprocess.CalledProcessError(1, ['sbatch', str(refused)])
    slurm._remove_refused(str(folder), before, ours, error)
    assert sorted(os.listdir(folder)) == sorted([old.name, f'2{"b" * 31}.pkl', 'c' * 32 + '.pkl', racing.name])


def test_a_cancelled_cell_ends_said_as_cancelled_not_failed(tmp_path):
    """Followed or run: a cell --cancel stopped gets a 'cancelled' line and count, not 'FAILED', and the
    command's last lines list it as cancelled; a real failure beside it is still a failure. A ResNet cell's
    done line names its method, Percentile."""
    from utils.runner.command import report_end
    from utils.runner.progress import Cancelled
    lines = []
    a, b, c = make_cell(tmp_path, 0), make_cell(tmp_path, 1), make_cell(tmp_path, 2)
    resnet = Cell('resnet18', 'resnet18', 'resnet', 'quant', 4, 4, 0, str(tmp_path / 'r'), str(tmp_path / 'e.py'), ())
    progress = Progress(lines.append, 4, 0, [], 1)
    progress.ended(a, False, Cancelled('cancelled (--cancel at 2030-01-02 03:04:05)'), 61.0, -15, [], [], 'a.log')
    progress.ended(b, False, 'error: stand-in failure', 2.0, 2, [], [], 'b.log')
    progress.ended(resnet, True, {'repq_top1': 58.25, 'qwt_top1': 68.5}, 3.0, 0, [], [], 'r.log')
    assert lines[0].startswith('cancelled deit_tiny W4/A4 seed 0 after 1m01s: cancelled (--cancel at 2030-01-02 '
                               '03:04:05) | 0/4 done, 0 failed, 1 cancelled, 0 running')
    assert lines[1].startswith('FAILED deit_tiny W4/A4 seed 1 (exit 2) after ') and '1 failed, 1 cancelled' in lines[1]
    assert 'Percentile 58.25, + QwT 68.50' in lines[2]
    out = tmp_path / 'out.txt'
    with open(out, 'w') as f:
        code = report_end([a, b, c], {x: ('to run', '', None) for x in (a, b, c)}, progress.outcome, f)
    text = out.read_text()
    assert code == 1 and 'cancelled: deit_tiny W4/A4 seed 0: cancelled (--cancel at 2030-01-02 03:04:05)' in text
    assert 'failed: deit_tiny W4/A4 seed 1: error: stand-in failure' in text and 'failed: deit_tiny W4/A4 seed 0' not in text
    assert text.rstrip().endswith('1 cell(s) failed, 1 cancelled, 0 not run; fix them and run the same command again')
    ok, why = cells.record_end(c, LAUNCH, 'cmd', 0, 1.0, time.time())  # no cancel: no Cancelled
    assert not isinstance(why, Cancelled)
