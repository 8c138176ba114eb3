"""tools/reproduce.py --backend slurm against a real SLURM cluster (.ci/slurm/start makes a one-node one on
localhost; CI starts it and sets QWT_REQUIRE_SLURM=1, so that these tests fail rather than skip there).
Cells are runs of the tiny registered models (tests/tiny_entry.py) or of the stand-in entry script."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from utils.run.demo import make_image_folder
from utils.runner import command as reproduce
from utils.runner.cells import plan
from utils.runner.flags import build_parser
from utils.runner.slurm import CellJob

STAND_IN = os.path.join(ROOT, 'tests', 'stand_in_entry.py')
TINY_ENTRY = os.path.join(ROOT, 'tests', 'tiny_entry.py')
TOOL = os.path.join(ROOT, 'tools', 'reproduce.py')


def _cluster_problem():
    try:
        p = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f'no SLURM cluster answers (sinfo: {e}); start one with .ci/slurm/start'
    if p.returncode != 0 or not {'idle', 'mixed', 'allocated'} & set(p.stdout.split()):
        return f"no idle SLURM node (sinfo: {(p.stdout + p.stderr).strip() or 'nothing'}); start one with .ci/slurm/start"
    return None


@pytest.fixture(scope='module', autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem and os.environ.get('QWT_REQUIRE_SLURM'):
        pytest.fail(f'QWT_REQUIRE_SLURM is set but {problem}')
    if problem:
        pytest.skip(problem)


pytestmark = pytest.mark.slurm


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet')))


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    for name in ('STAND_IN_ACC', 'STAND_IN_FAIL', 'STAND_IN_SLEEP', 'STAND_IN_SLEEP_ONCE', 'STAND_IN_PID', 'STAND_IN_DEAF', 'STAND_IN_LOG',
                 'STAND_IN_TERM_S'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run(capsys, *argv):
    code = reproduce.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def slurm_args(data_dir, out, *extra, script=STAND_IN):
    return ['--backend', 'slurm', '--device', 'cpu', '--data_dir', data_dir, '--output_dir', str(out),
            '--script', script, *extra]


def record(out, folder):
    with open(os.path.join(out, folder, 'cell.json')) as f:
        return json.load(f)


def queued_ids():
    p = subprocess.run(['squeue', '-h', '-r', '-o', '%i'], capture_output=True, text=True, check=True)
    return set(p.stdout.split())


def wait_for(predicate, timeout=60, what='a condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f'timed out waiting for {what}')


def test_two_cells_are_two_jobs_with_the_local_backends_accuracies(data_dir, tmp_path, capsys, env):
    """Real runs of the tiny ViT (FP and W4/A4): one job array of two jobs, and result.json accuracies equal
    to the local backend's on the same cells (one thread each)."""
    common = ['--models', 'vit_test_tiny', '--bits', '4', '--', '--batch_size', '4', '--qwt_samples', '8',
              '--allow_class_subset']
    code, out, err = run(capsys, *slurm_args(data_dir, tmp_path / 'slurm', script=TINY_ENTRY), *common)
    assert code == 0, out + err
    assert 'submitted 2 cell(s) as SLURM job array' in out and out.count(' on ') >= 2
    code, local_out, err = run(capsys, '--device', 'cpu', '--data_dir', data_dir, '--output_dir',
                               str(tmp_path / 'local'), '--script', TINY_ENTRY, *common)
    assert code == 0, local_out + err
    ids = [record(tmp_path / 'slurm', f)['job_id'] for f in ('vit_test_tiny_fp', 'vit_test_tiny_w4a4_seed0')]
    assert len(set(ids)) == 2 and len({i.split('_')[0] for i in ids}) == 1  # two tasks of one array
    for folder in ('vit_test_tiny_fp', 'vit_test_tiny_w4a4_seed0'):
        s, loc = (json.load(open(tmp_path / b / folder / 'result.json')) for b in ('slurm', 'local'))
        for key in ('fp_top1', 'ptq_top1', 'qwt_top1', 'ptq_top5', 'qwt_top5', 'calib_files', 'qwt_files'):
            assert s[key] == loc[key], (folder, key)
        assert record(tmp_path / 'slurm', folder)['status'] == 'done'
        assert record(tmp_path / 'slurm', folder)['runs'] == 1
    table = (tmp_path / 'slurm' / 'results_table.md').read_text()
    assert table == (tmp_path / 'local' / 'results_table.md').read_text()


def test_a_failing_cell_reports_its_error_line_and_the_others_finish(data_dir, tmp_path, capsys, env):
    env.setenv('STAND_IN_FAIL', 'swin_tiny')
    code, out, _ = run(capsys, *slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', 'swin_tiny', '--bits', '4'))
    assert code == 1
    assert 'FAILED swin_tiny FP (exit 2) after ' in out and ': error: stand-in failure of swin_tiny [' in out
    assert 'done deit_tiny W4/A4 seed 0' in out and 'done deit_tiny FP' in out
    assert record(tmp_path, 'swin_tiny_fp')['last_line'] == 'error: stand-in failure of swin_tiny'
    assert record(tmp_path, 'deit_tiny_w4a4_seed0')['status'] == 'done'
    assert '2 cell(s) failed, 0 not run' in out


def test_no_wait_then_the_same_command_collects_the_table(data_dir, tmp_path, capsys, env):
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4')
    code, out, _ = run(capsys, *argv, '--no_wait')
    assert code == 0 and 'not waiting (--no_wait)' in out
    assert not (tmp_path / 'results_table.md').exists()
    ids = {f: record(tmp_path, f)['job_id'] for f in ('deit_tiny_fp', 'deit_tiny_w4a4_seed0')}
    code, out, _ = run(capsys, *argv)
    assert code == 0 and 'submitted' not in out
    assert {f: record(tmp_path, f)['job_id'] for f in ids} == ids  # followed, not submitted again
    assert '| DeiT-T | W4/A4 |' in (tmp_path / 'results_table.md').read_text()


def test_submitter_killed_then_rerun_submits_nothing_twice(data_dir, tmp_path, capsys, env):
    env.setenv('STAND_IN_SLEEP', '6')
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4')
    proc = subprocess.Popen([sys.executable, TOOL, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folders = ('deit_tiny_fp', 'deit_tiny_w4a4_seed0')
    wait_for(lambda: all(os.path.exists(tmp_path / f / 'cell.json') for f in folders), what='the submission')
    ids = {f: record(tmp_path, f)['job_id'] for f in folders}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert set(ids.values()) <= queued_ids()  # the jobs go on without their submitter
    code, out, _ = run(capsys, *argv)
    assert code == 0 and 'submitted' not in out and '2 queued or running already' in out
    assert {f: record(tmp_path, f)['job_id'] for f in folders} == ids
    assert all(record(tmp_path, f)['status'] == 'done' for f in folders)
    for f, label in zip(folders, ('deit_tiny FP', 'deit_tiny W4/A4 seed 0')):  # the job's start, not when noticed
        assert f"[{record(tmp_path, f)['started'][11:]}] start {label} on " in out


def test_a_cancelled_job_is_submitted_again_by_the_rerun(data_dir, tmp_path, capsys, env):
    env.setenv('STAND_IN_SLEEP', '4')
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4')
    assert run(capsys, *argv, '--no_wait')[0] == 0
    fp, quant = record(tmp_path, 'deit_tiny_fp')['job_id'], record(tmp_path, 'deit_tiny_w4a4_seed0')['job_id']
    subprocess.run(['scancel', fp], check=True)
    wait_for(lambda: fp not in queued_ids(), what=f'job {fp} to leave the queue')
    code, out, _ = run(capsys, *argv)
    assert code == 0, out
    assert 'deit_tiny  FP              to run: interrupted last time' in out
    assert 'submitted 1 cell(s) as SLURM job array' in out
    assert record(tmp_path, 'deit_tiny_fp')['job_id'] != fp and record(tmp_path, 'deit_tiny_fp')['status'] == 'done'
    assert record(tmp_path, 'deit_tiny_w4a4_seed0')['job_id'] == quant


def test_cancel_cancels_the_plans_jobs_and_their_cells_say_cancelled(data_dir, tmp_path, capsys, env):
    """Running jobs get scancel's SIGTERM and their runs end with -15: the cells stay cancelled, not failed."""
    env.setenv('STAND_IN_SLEEP', '30')
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4')
    assert run(capsys, *argv, '--no_wait')[0] == 0
    folders = ('deit_tiny_fp', 'deit_tiny_w4a4_seed0')
    ids = {record(tmp_path, f)['job_id'] for f in folders}
    wait_for(lambda: all(record(tmp_path, f)['status'] == 'running' for f in folders), what='the jobs to start')
    code, out, _ = run(capsys, *argv, '--cancel')
    assert code == 0 and f"cancelled 2 job(s): {' '.join(sorted(ids))}" in out
    wait_for(lambda: not ids & queued_ids(), what='the cancelled jobs to leave the queue')  # COMPLETING included
    for f in folders:
        r = record(tmp_path, f)
        assert (r['status'], r['returncode'], r['job_id'] in ids) == ('cancelled', -signal.SIGTERM, True), r
    code, out, _ = run(capsys, *argv, '--dry_run')
    fp = record(tmp_path, 'deit_tiny_fp')
    assert code == 0 and '0 done, 2 to run' in out
    assert f"deit_tiny  FP              to run: cancelled last time (job {fp['job_id']}, --cancel at " \
           f"{fp['cancelled']})" in out


def test_a_bad_partition_is_refused_in_one_line_with_nothing_queued_or_left(data_dir, tmp_path, capsys, env):
    """Nor any of submitit's files of the refused array (a pickle per cell, the sbatch script); an older stray
    pickle in the folder stays."""
    from submitit.helpers import DelayedSubmission
    before = queued_ids()
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4', '--partition', 'no_such_partition')
    cells, launch = plan(build_parser().parse_args(argv))
    old = tmp_path / 'slurm' / ('0' * 32 + '.pkl')  # of an earlier submission of the same cell
    old.parent.mkdir()
    DelayedSubmission(CellJob(cells[0], launch, {})).dump(old)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count('\n') == 1 and err.startswith('error: sbatch refused the job array: ')
    assert 'invalid partition' in err.lower()
    assert queued_ids() <= before and not (tmp_path / 'deit_tiny_fp' / 'cell.json').exists()
    assert os.listdir(tmp_path / 'slurm') == [old.name]


def test_a_preempted_job_is_requeued_and_its_cell_counts_the_runs(data_dir, tmp_path, capsys, env):
    """SIGUSR2, as SLURM sends it before preemption or the time limit: submitit checkpoints and requeues; the
    cell starts again from the beginning and its cell.json says it ran twice. Run 1 waits until it is preempted (a
    fixed wait could end first on a loaded machine: the job done, run once); run 2 does not wait."""
    env.setenv('STAND_IN_SLEEP_ONCE', 'deit_tiny_fp:300')
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4', '--no_wait')
    assert run(capsys, *argv)[0] == 0
    job = record(tmp_path, 'deit_tiny_fp')['job_id']
    wait_for(lambda: record(tmp_path, 'deit_tiny_fp')['status'] == 'running', what='the job to start')
    subprocess.run(['scancel', '--signal=USR2', job], check=True)
    code, out, _ = run(capsys, *argv[:-1])
    assert code == 0, out
    r = record(tmp_path, 'deit_tiny_fp')
    assert r['status'] == 'done' and r['runs'] == 2 and r['job_id'] == job
    # the follower found run 1 running (its record stays so when the job is requeued), then run 2 started
    assert f'] start deit_tiny FP on {r["host"]} (job {job}, run 1)' in out, out
    assert f'[{r["started"][11:]}] start deit_tiny FP on {r["host"]} (job {job}, run 2)' in out, out
    assert open(tmp_path / 'deit_tiny_fp' / 'console.txt').read().count(f'==== ') == 2


def test_a_rerun_right_after_cancel_keeps_its_record_from_the_cancelled_job(data_dir, tmp_path, capsys, env):
    """scancel's SIGTERM takes 3 s to end each cancelled run (STAND_IN_TERM_S, as torchrun's shutdown of its
    workers), and the same command submits the cells again meanwhile (held back 60 s, so that only the
    cancelled jobs write): their ends leave the new submission's records as they are."""
    env.setenv('STAND_IN_SLEEP', '60')
    env.setenv('STAND_IN_TERM_S', '3')
    argv = slurm_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4', '--no_wait')
    folders = ('deit_tiny_fp', 'deit_tiny_w4a4_seed0')
    assert run(capsys, *argv)[0] == 0
    old = {record(tmp_path, f)['job_id'] for f in folders}
    wait_for(lambda: all(record(tmp_path, f)['status'] == 'running' for f in folders), what='the jobs to start')
    assert run(capsys, *argv, '--cancel')[0] == 0
    code, out, err = run(capsys, *argv, '--slurm_opt', 'begin=now+60')
    assert code == 0 and 'submitted 2 cell(s)' in out, out + err
    new = {f: record(tmp_path, f) for f in folders}
    assert not old & {r['job_id'] for r in new.values()}
    wait_for(lambda: not old & queued_ids(), what='the cancelled jobs to end')
    for f in folders:
        assert record(tmp_path, f) == new[f] and new[f]['status'] == 'queued' and new[f]['token'], record(tmp_path, f)
    ended = sorted(n for n in os.listdir(tmp_path / 'slurm') if n.endswith('_result.pkl'))
    assert ended == sorted(f'{j}_0_result.pkl' for j in old), ended  # the cancelled runs did reach their ends
    code, out, _ = run(capsys, *argv, '--cancel')
    assert code == 0 and out.rstrip().endswith(f"cancelled 2 job(s): {' '.join(sorted(r['job_id'] for r in new.values()))}")
