"""tools/reproduce.py: the plan of a flag set, resuming (a second run starts no cell), cells at once, a failing
cell among finishing ones, Ctrl-C, torchrun launches, seed statistics in the table. Most runs use
tests/stand_in_entry.py (--script), which takes the entry scripts' flags and writes a result.json in a
fraction of a second; one test runs the real pipeline on the tiny conftest models (tests/tiny_entry.py)."""
import _thread
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, save_random_checkpoint
from utils.table import figures
from utils.runner import cells as table_cells
from utils.runner import flags as runner_flags
from utils.runner import local, progress
from utils.runner import command as reproduce
from utils.run.demo import make_image_folder
from utils.run.weights import published_weights

STAND_IN = os.path.join(ROOT, 'tests', 'stand_in_entry.py')
TINY_ENTRY = os.path.join(ROOT, 'tests', 'tiny_entry.py')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet')))  # 3 classes, 12 train, 6 val images


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Child runs with one thread, a stand-in log, and no stand-in settings from elsewhere."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    for name in ('STAND_IN_ACC', 'STAND_IN_FAIL', 'STAND_IN_SLEEP'):
        monkeypatch.delenv(name, raising=False)
    log = tmp_path / 'stand_in.jsonl'
    monkeypatch.setenv('STAND_IN_LOG', str(log))
    return monkeypatch, log


def runs(log):
    """The stand-in's log: one dict per child process."""
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def reproduce_main(capsys, *argv):
    """tools/reproduce.py in this process; returns (exit code, stdout, stderr)."""
    code = reproduce.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cpu_args(data_dir, out, *extra):
    return ['--data_dir', data_dir, '--output_dir', str(out), '--device', 'cpu', '--script', STAND_IN, *extra]


# ---- the plan ------------------------------------------------------------------------------------

def test_plan_of_a_flag_set(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    ckpts = tmp_path / 'ckpts'
    os.makedirs(ckpts)
    (ckpts / 'deit_tiny_patch16_224-a1311bcf.pth').write_bytes(b'')  # only checked for existence at plan time
    out = tmp_path / 'out'
    args = runner_flags.build_parser().parse_args(
        ['--data_dir', data_dir, '--models', 'deit_tiny', 'swin_tiny_patch4_window7_224', '--bits', '4', '4/8',
         '--seeds', '0', '1', '--device', 'cpu', '--parallel', '2', '--output_dir', str(out), '--checkpoint_dir',
         str(ckpts)])
    cells, launch = table_cells.plan(args, ['--qwt_samples', '64'])
    assert [c.label for c in cells] == [
        'deit_tiny FP', 'deit_tiny W4/A4 seed 0', 'deit_tiny W4/A4 seed 1', 'deit_tiny W4/A8 seed 0',
        'deit_tiny W4/A8 seed 1', 'swin_tiny FP', 'swin_tiny W4/A4 seed 0', 'swin_tiny W4/A4 seed 1',
        'swin_tiny W4/A8 seed 0', 'swin_tiny W4/A8 seed 1']
    cores = len(os.sched_getaffinity(0))
    assert launch == runner_flags.Launch('cpu', (None, None), 1, max(1, cores // 2))
    deit = cells[3]
    assert deit.script == os.path.join(ROOT, 'qwt_vit_and_deit.py') and cells[6].script == os.path.join(ROOT, 'qwt_swin.py')
    assert deit.folder == str(out / 'deit_tiny_w4a8_seed0')
    assert deit.flags == ('--qwt_samples', '64', '--model', 'deit_tiny', '--data_dir', data_dir, '--checkpoint',
                          str(ckpts / 'deit_tiny_patch16_224-a1311bcf.pth'), '--w_bit', '4', '--a_bit', '8', '--seed',
                          '0', '--eval', 'both', '--device', 'cpu', '--output_dir', deit.folder)
    assert cells[0].folder == str(out / 'deit_tiny_fp') and cells[0].flags[8:] == ('--eval', 'fp', '--device', 'cpu',
                                                                                  '--output_dir', cells[0].folder)
    assert all(c.blocked is None for c in cells[:5])
    assert all(c.blocked == f'swin_tiny: no swin_tiny_patch4_window7_224.pth in {ckpts} (download '
                            'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
                            'swin_tiny_patch4_window7_224.pth)' for c in cells[5:])
    argv, child_env = local.command(deit, launch, 1)
    assert argv == [sys.executable, deit.script, *deit.flags]
    assert child_env['OMP_NUM_THREADS'] == str(max(1, cores // 2)) and 'CUDA_VISIBLE_DEVICES' not in child_env
    assert table_cells.identity(deit, launch) == {
        'format': 1, 'script': 'qwt_vit_and_deit.py', 'flags': [f for f in deit.flags if f not in ('--output_dir',
                                                                                                   deit.folder)],
        'device': 'cpu', 'procs': 1}


def test_plan_on_gpus(data_dir, tmp_path):
    args = runner_flags.build_parser().parse_args(['--data_dir', data_dir, '--models', 'swin_small', '--seeds', '3',
                                                '--gpus', '0,1,2,3', '4', '--gpus_per_run', '2',
                                                '--output_dir', str(tmp_path)])
    cells, launch = table_cells.plan(args)
    assert launch.slots == (('0', '1'), ('2', '3')) and launch.procs == 2  # GPU 4 is left over
    assert [c.label for c in cells] == ['swin_small FP', 'swin_small W4/A4 seed 3', 'swin_small W6/A6 seed 3']
    argv, child_env = local.command(cells[2], launch, 1)
    assert argv == [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    os.path.join(ROOT, 'qwt_swin.py'), *cells[2].flags]
    assert child_env['CUDA_VISIBLE_DEVICES'] == '2,3' and '--device' in cells[2].flags
    assert cells[2].flags[cells[2].flags.index('--device') + 1] == 'cuda'


def test_default_plan_is_the_whole_table(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner_flags, 'visible_gpus', lambda: ['0', '1', '2', '3', '4', '5', '6', '7'])
    code, out, err = reproduce_main(capsys, '--data_dir', data_dir, '--output_dir', str(tmp_path), '--dry_run')
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f'plan: 13 model(s) x 2 bit width(s) x 1 seed(s) = 26 quantized cell(s), plus 13 FP cell(s), '
                        f'in {tmp_path}')
    assert lines[1] == 'on 8 GPU slot(s): 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7'
    assert [ln.split()[0] for ln in lines[2:32:3]] == ['deit_tiny', 'deit_small', 'deit_base', 'deit_tiny_distilled',
                                                       'deit_small_distilled', 'deit_base_distilled', 'vit_small',
                                                       'vit_base', 'swin_tiny', 'swin_small']
    assert lines[2:5] == ['  deit_tiny             FP              to run',
                          '  deit_tiny             W4/A4  seed 0   to run',
                          '  deit_tiny             W6/A6  seed 0   to run']
    # the ResNets (Percentile), blocked without their published weights in pretrained_weights/ (never downloaded)
    assert [ln.split()[0] for ln in lines[32:41:3]] == ['resnet18', 'resnet50', 'resnet101']
    assert lines[32] == '  resnet18              FP              blocked: no checkpoint'
    assert lines[41] == (f'  blocked: resnet18: no resnet18_imagenet.pth.tar in {os.getcwd()}/pretrained_weights '
                         '(download https://github.com/yhhhli/BRECQ/releases/download/v1.0/resnet18_imagenet.pth.tar)')
    assert lines[43].startswith('  blocked: resnet101: no resnet101-63fe2227.pth in ') and lines[43].endswith(
        '(download https://download.pytorch.org/models/resnet101-63fe2227.pth)')
    assert lines[44] == '39 cells: 0 done, 30 to run, 9 blocked; estimate: once a first cell has finished'
    assert not os.listdir(tmp_path)  # a dry run starts nothing


@pytest.mark.parametrize('argv, message', [
    ([], 'no GPU visible (torch.cuda.device_count() is 0): pass --device cpu [--parallel N] to run on the CPU'),
    (['--device', 'cpu', '--', '--seed', '3'],
     'after --: --seed is set by tools/reproduce.py for each cell (use --seeds)'),
    (['--device', 'cpu', '--', '--w_bits', '6'], 'after --: --w_bits is set by tools/reproduce.py for each cell '
                                                  '(use --bits)'),
    (['--device', 'cpu', '--', '--seed', '0'], 'after --: --seed is set'),  # the default value, typed
    (['--device', 'cpu', '--', '--eval=both'], 'after --: --eval is set by tools/reproduce.py for each cell (every '
                                               'quantized cell runs --eval both, and each model one --eval fp cell)'),
    (['--device', 'cpu', '--', '--no_such_flag'], 'after --: unrecognized arguments: --no_such_flag'),
    (['--device', 'cpu', '--models', 'deit_tiny', '--', '--qwt_samples', '63'],
     'deit_tiny W4/A4 seed 0: --qwt_samples 63 is not a multiple of --batch_size 32 x 1 process(es) = 32: use 32 or 64'),
    (['--gpus', '0', '1', '2', '--gpus_per_run', '2', '--models', 'deit_tiny', '--', '--qwt_samples', '96'],
     'deit_tiny W4/A4 seed 0: --qwt_samples 96 is not a multiple of --batch_size 32 x 2 process(es) = 64: use 64 or '
     '128'),
    (['--device', 'cpu', '--bits', '9'], '--bits 9: expected N or W/A with bit widths 2 to 8'),
    (['--device', 'cpu', '--bits', 'w4'], '--bits w4: expected N (WN/AN) or W/A such as 4/8'),
    (['--parallel', '2'], '--parallel is for --device cpu; on GPUs one cell runs on each GPU (--gpus, --gpus_per_run)'),
    (['--gpus', '0', '--gpus_per_run', '2'], '--gpus_per_run 2 needs at least 2 GPUs; 1 given or visible'),
    (['--gpus', '0', '0'], '--gpus 0 0: a GPU is named twice'),
    (['--device', 'cpu', '--models', 'resnet34'], "model 'resnet34' is not a ViT, DeiT or Swin transformer"),
    (['--device', 'cpu', '--checkpoint_dir', '/no/such/dir'], '--checkpoint_dir /no/such/dir is not a directory'),
    # ResNet flags, checked for blocked models too (no weights in pretrained_weights/): 64 // 3 = 21 groups do not
    # split resnet18's 64 stem channels; 64 // 48 = 1 and 128 // 48 = 2 do, 256 // 48 = 5 (layer3's second
    # block) does not
    (['--device', 'cpu', '--models', 'resnet18', '--', '--factor', '3'],
     'after --: resnet18: --factor 3 makes 21 groups of 64 input channels, which do not split 64 input and 64 output'),
    (['--device', 'cpu', '--models', 'resnet18', '--', '--factor', '48'],
     'after --: resnet18: --factor 48 makes 5 groups of 256 input channels, which do not split 256 input and 256'),
    (['--device', 'cpu', '--models', 'resnet18', '--', '--kernel_size', '2'], 'after --: --kernel_size 2 must be odd'),
])
def test_usage_errors(data_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(runner_flags, 'visible_gpus', lambda: [])
    code, out, err = reproduce_main(capsys, '--data_dir', data_dir, '--output_dir', str(tmp_path), *argv)
    assert code == 2 and out == ''
    assert err.startswith('error: ') and err.count('\n') == 1
    assert message in err, err


def test_resnet_grouping_that_fits_is_planned(data_dir, tmp_path, capsys, monkeypatch):
    """resnet50's blocks (64 ... 2048 channels) all split into C_in // 32 groups."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    code, out, err = reproduce_main(capsys, '--data_dir', data_dir, '--output_dir', str(tmp_path), '--device', 'cpu',
                                    '--models', 'resnet50', '--bits', '4', '--dry_run', '--', '--factor', '32',
                                    '--kernel_size', '3')
    assert (code, err) == (0, '') and out.splitlines()[1] == 'on 1 CPU slot(s); flags for every run: --factor 32 ' \
                                                            '--kernel_size 3'


def test_data_dir_is_required(capsys):
    code, _, err = reproduce_main(capsys, '--device', 'cpu')
    assert (code, err) == (2, 'error: the following arguments are required: --data_dir\n')


def test_exactly_gpus_per_run_gpus_is_one_slot(data_dir, tmp_path, capsys, monkeypatch):
    """Two GPUs visible and --gpus_per_run 2: one slot of both GPUs, not 'needs at least 2 GPUs'."""
    monkeypatch.setattr(runner_flags, 'visible_gpus', lambda: ['0', '1'])
    code, out, err = reproduce_main(capsys, '--data_dir', data_dir, '--output_dir', str(tmp_path), '--models',
                                    'deit_tiny', '--bits', '4', '--gpus_per_run', '2', '--dry_run')
    assert (code, err) == (0, '')
    assert out.splitlines()[1] == 'on 1 GPU slot(s) (2 GPUs per cell, torchrun): 0,1'


@pytest.mark.parametrize('bits, label', [('2', 'W2/A2'), ('8', 'W8/A8')])
def test_bits_2_and_8_are_accepted(data_dir, tmp_path, capsys, bits, label):
    code, out, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', bits,
                                                      '--dry_run'))
    assert (code, err) == (0, '')
    assert f'  deit_tiny  {label}  seed 0   to run' in out.splitlines()


@pytest.mark.parametrize('bits', ['1', '9', '1/4', '4/1', '9/4', '4/9'])
def test_bits_1_and_9_are_refused(data_dir, tmp_path, capsys, bits):
    """Refused by --bits itself (not only later by the entry script's --w_bit check of each cell), for the
    weights and for the activations."""
    code, out, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', bits,
                                                      '--dry_run'))
    assert (code, out, err) == (2, '', f'error: --bits {bits}: expected N or W/A with bit widths 2 to 8\n')


def test_seeds_up_to_2_to_the_32_minus_1(data_dir, tmp_path, capsys):
    """numpy's seed range: 2^32 - 1 = 4294967295 is the largest seed; 2^32 is refused by --seeds itself (not
    only later by the entry script's --seed check of each cell, whose message differs)."""
    argv = cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4', '--dry_run')
    code, out, err = reproduce_main(capsys, *argv, '--seeds', '4294967295')
    assert (code, err) == (0, '')
    assert '  deit_tiny  W4/A4  seed 4294967295 to run' in out.splitlines()
    code, out, err = reproduce_main(capsys, *argv, '--seeds', '4294967296')
    assert (code, out, err) == (2, '', 'error: --seeds 4294967296 is outside 0..2^32-1\n')


@pytest.mark.parametrize('flags', [['--seeds', '0', '0'], ['--bits', '4', '4/4']])
def test_a_repeated_seed_or_bit_width_is_one_cell(data_dir, tmp_path, flags):
    """'4' and '4/4' are both W4/A4: each cell is planned once, in one folder."""
    args = runner_flags.build_parser().parse_args(cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4',
                                                        *flags))
    cells, _ = table_cells.plan(args)
    assert [c.label for c in cells] == ['deit_tiny FP', 'deit_tiny W4/A4 seed 0']


@pytest.mark.parametrize('affinity', [True, False])
@pytest.mark.parametrize('parallel, threads', [(3, '2'), (16, '1')])
def test_cpu_cell_threads_are_cores_over_parallel(data_dir, tmp_path, monkeypatch, affinity, parallel, threads):
    """8 cores: --parallel 3 gives each cell 8 // 3 = 2 threads; --parallel 16 gives 1, never 0. The cores
    are the process's CPU affinity, or os.cpu_count() where the platform has none."""
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    if affinity:
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)), raising=False)
        monkeypatch.setattr(os, 'cpu_count', lambda: 64)  # not what counts when the affinity is known
    else:
        monkeypatch.delattr(os, 'sched_getaffinity', raising=False)
        monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    args = runner_flags.build_parser().parse_args(cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4',
                                                        '--parallel', str(parallel)))
    cells, launch = table_cells.plan(args)
    assert len(launch.slots) == parallel
    for slot in (0, parallel - 1):
        _, child_env = local.command(cells[1], launch, slot)
        assert child_env['OMP_NUM_THREADS'] == threads


# ---- running ---------------------------------------------------------------------------------------

def test_second_run_starts_no_cell_and_other_flags_rerun(data_dir, tmp_path, capsys, env):
    monkeypatch, log = env
    out = tmp_path / 'out'
    argv = cpu_args(data_dir, out, '--models', 'deit_tiny', 'swin_tiny', '--bits', '4', '--parallel', '2')
    code, stdout, err = reproduce_main(capsys, *argv)
    assert code == 0, stdout + err
    assert sorted(r['key'] for r in runs(log)) == ['deit_tiny FP', 'deit_tiny W4/A4 seed 0', 'swin_tiny FP',
                                                   'swin_tiny W4/A4 seed 0']
    assert '4 cells: 0 done, 4 to run, 0 blocked; estimate: once a first cell has finished' in stdout
    assert 'done deit_tiny W4/A4 seed 0 in ' in stdout and 'RepQ-ViT 50.00, + QwT 55.00 |' in stdout
    assert '4/4 done, 0 failed, 0 running' in stdout
    for c in ('deit_tiny_fp', 'deit_tiny_w4a4_seed0', 'swin_tiny_fp', 'swin_tiny_w4a4_seed0'):
        assert {'cell.json', 'result.json', 'log.txt', 'console.txt'} <= set(os.listdir(out / c))
    assert json.load(open(out / 'deit_tiny_w4a4_seed0' / 'cell.json'))['status'] == 'done'
    stamps = {c: os.stat(out / c / 'result.json').st_mtime_ns for c in os.listdir(out) if os.path.isdir(out / c)}

    code, stdout, _ = reproduce_main(capsys, *argv)  # the same command again: nothing starts
    assert code == 0 and len(runs(log)) == 4
    assert '4 cells: 4 done, 0 to run, 0 blocked' in stdout and 'nothing to run' in stdout and 'start ' not in stdout
    assert '  deit_tiny  W4/A4  seed 0   done (' in stdout
    assert stamps == {c: os.stat(out / c / 'result.json').st_mtime_ns for c in stamps}
    assert '| DeiT-T | W4/A4 | 72.2 | 80.00 | 58.2 | 61.4 | 50.00 | 55.00 | +7.80 | -8.20 | -6.40 | 1 |  |' in stdout

    # a result.json changed by hand: that cell alone runs again
    path = out / 'swin_tiny_w4a4_seed0' / 'result.json'
    path.write_text(path.read_text().replace('"qwt_top1": 55.0', '"qwt_top1": 99.0'))
    code, stdout, _ = reproduce_main(capsys, *argv)
    assert code == 0 and [r['key'] for r in runs(log)[4:]] == ['swin_tiny W4/A4 seed 0']
    assert 'swin_tiny  W4/A4  seed 0   to run: result.json changed since' in stdout

    # other flags for every run: every cell runs again, in the same folders
    code, stdout, _ = reproduce_main(capsys, *argv, '--', '--qwt_samples', '64')
    assert code == 0 and len(runs(log)) == 9
    assert stdout.count('to run: other flags last time') == 4
    assert all(r['argv'][:2] == ['--qwt_samples', '64'] for r in runs(log)[5:])


@pytest.mark.parametrize('done_with, asked', [(1, 2), (2, 1)])
def test_a_cell_done_with_other_processes_per_cell_runs_again(data_dir, tmp_path, done_with, asked):
    """A cell.json and result.json written by hand as a finished cell of --gpus 0 1 with --gpus_per_run
    ``done_with``: done for that launch, not for --gpus_per_run ``asked`` (the same flags, device and script)."""
    import hashlib

    def planned(gpus_per_run):
        args = runner_flags.build_parser().parse_args(['--data_dir', data_dir, '--output_dir', str(tmp_path), '--models',
                                                    'deit_tiny', '--bits', '4', '--gpus', '0', '1', '--gpus_per_run',
                                                    str(gpus_per_run)])
        cells, launch = table_cells.plan(args)
        return cells[1], launch

    cell, launch_done = planned(done_with)
    other, launch_asked = planned(asked)
    assert other == cell and launch_done.procs == done_with and launch_asked.procs == asked
    os.makedirs(cell.folder)
    result = {'timm_name': 'deit_tiny_patch16_224', 'eval': 'both', 'w_bits': 4, 'a_bits': 4, 'seed': 0,
              'repq_top1': 50.0, 'qwt_top1': 55.0}
    with open(cell.result_path, 'w') as f:
        json.dump(result, f)
    assert cell.flags[-2:] == ('--output_dir', cell.folder)
    record = {'format': 1, 'script': 'qwt_vit_and_deit.py', 'flags': list(cell.flags[:-2]), 'device': 'cuda',
              'procs': done_with, 'status': 'done', 'wall_s': 75.0,
              'result_sha256': hashlib.sha256(open(cell.result_path, 'rb').read()).hexdigest()}
    with open(cell.cell_path, 'w') as f:
        json.dump(record, f)
    state, detail, _ = table_cells.cell_state(cell, launch_done)
    assert (state, detail) == ('done', '(1m15s)')
    assert table_cells.cell_state(cell, launch_asked) == ('to run', 'other flags last time', None)


def test_two_cells_run_at_once(data_dir, tmp_path, capsys, env):
    monkeypatch, log = env
    monkeypatch.setenv('STAND_IN_SLEEP', '1.5')
    code, stdout, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4',
                                                         '--seeds', '0', '1', '--parallel', '2'))
    assert code == 0, stdout + err
    spans = [(r['start'], r['end']) for r in runs(log)]
    assert len(spans) == 3
    at_once = [sum(s <= t < e for s, e in spans) for t, _ in spans]  # cells running when each one started
    assert max(at_once) == 2
    assert stdout.count(' on CPU slot 1') + stdout.count(' on CPU slot 2') == 3 and ' on CPU slot 2' in stdout
    assert all(r['env']['OMP_NUM_THREADS'] == '1' for r in runs(log))  # set by the caller: kept
    assert 'left' in stdout.split('done ', 2)[2]  # an estimate once a first cell has finished


def test_seed_statistics_in_the_table(data_dir, tmp_path, capsys, env):
    """Three seeds of deit_small W4/A4: RepQ-ViT 60, 61, 65 -> 62.00 ± sqrt(7) = 2.65; + QwT 70, 70.5, 71.5 ->
    70.67 ± sqrt(0.58333) = 0.76; FP 79.5 against the paper's 79.9."""
    monkeypatch, log = env
    acc = {'deit_small W4/A4 seed 0': [60.0, 70.0], 'deit_small W4/A4 seed 1': [61.0, 70.5],
           'deit_small W4/A4 seed 2': [65.0, 71.5], 'deit_small FP': 79.5}
    monkeypatch.setenv('STAND_IN_ACC', json.dumps(acc))
    code, stdout, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_small', '--bits', '4',
                                                         '--seeds', '0', '1', '2', '--parallel', '2'))
    assert code == 0, stdout + err
    row = '| DeiT-S | W4/A4 | 79.9 | 79.50 | 69.0 | 71.5 | 62.00 ± 2.65 | 70.67 ± 0.76 | -0.40 | -7.00 | -0.83 | 3 |  |'
    md = (tmp_path / 'results_table.md').read_text()
    assert md.splitlines()[2] == row and row in stdout and len(md.splitlines()) == 3
    import csv
    rows = list(csv.DictReader(open(tmp_path / 'results_table.csv')))
    assert len(rows) == 1 and rows[0]['seeds'] == '0 1 2' and rows[0]['n'] == '3'
    assert float(rows[0]['repq_std']) == pytest.approx(math.sqrt(7), abs=1e-4)
    assert float(rows[0]['qwt']) == pytest.approx(70.6667) and float(rows[0]['delta_qwt']) == pytest.approx(-0.8333)
    if figures.have_matplotlib():
        assert os.path.isfile(tmp_path / 'results_table.png')
        assert all(os.path.isfile(tmp_path / f'deit_small_w4a4_seed{s}' / 'r2.png') for s in range(3))
        assert not os.path.exists(tmp_path / 'deit_small_fp' / 'r2.png')


def test_torchrun_over_gpu_slots(data_dir, tmp_path, capsys, env):
    """--gpus_per_run 2: each cell is one torchrun of two processes that see only their slot's GPUs (the
    stand-in runs without GPUs, so the launch is checked on the CPU)."""
    monkeypatch, log = env
    code, stdout, err = reproduce_main(capsys, '--data_dir', data_dir, '--output_dir', str(tmp_path), '--script',
                                       STAND_IN, '--models', 'deit_tiny', '--bits', '4', '--gpus', '0,1,2,3',
                                       '--gpus_per_run', '2')
    assert code == 0, stdout + err
    got = sorted((r['key'], r['env']['RANK'], r['env']['WORLD_SIZE'], r['env']['CUDA_VISIBLE_DEVICES']) for r in runs(log))
    slots = {r['key']: r['env']['CUDA_VISIBLE_DEVICES'] for r in runs(log)}
    assert sorted(slots.values()) == ['0,1', '2,3']
    assert got == sorted((k, rank, '2', slots[k]) for k in ('deit_tiny FP', 'deit_tiny W4/A4 seed 0') for rank in '01')
    assert all(r['argv'][r['argv'].index('--device') + 1] == 'cuda' for r in runs(log))
    assert json.load(open(tmp_path / 'deit_tiny_w4a4_seed0' / 'result.json'))['world_size'] == 2


def test_ctrl_c_stops_every_child_and_keeps_finished_cells(data_dir, tmp_path, capsys, env):
    monkeypatch, log = env
    argv = cpu_args(data_dir, tmp_path, '--bits', '4', '--parallel', '2')
    assert reproduce_main(capsys, *argv, '--models', 'deit_tiny')[0] == 0
    finished = (tmp_path / 'deit_tiny_w4a4_seed0' / 'result.json').read_text()
    monkeypatch.setenv('STAND_IN_SLEEP', '60')
    monkeypatch.setenv('STAND_IN_DEAF', '1')  # the children ignore SIGINT: SIGKILL after the grace time
    monkeypatch.setattr(local, 'STOP_GRACE_S', 1.0)
    pids = []

    def interrupt_when_both_run():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids[:] = [int(line.split()[1]) for f in ('swin_tiny_fp', 'swin_tiny_w4a4_seed0')
                       for line in _read(tmp_path / f / 'console.txt').splitlines() if line.startswith('pid ')]
            if len(pids) == 2:
                break
            time.sleep(0.1)
        _thread.interrupt_main()  # as Ctrl-C

    monkeypatch.setenv('STAND_IN_PID', '1')
    # Python's own Ctrl-C handler, whatever an earlier test in this process left (interrupt_main does nothing
    # where SIGINT is ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=interrupt_when_both_run)
    t.start()
    start = time.monotonic()
    code, stdout, _ = reproduce_main(capsys, *argv, '--models', 'deit_tiny', 'swin_tiny')
    t.join()
    signal.signal(signal.SIGINT, previous)
    assert code == 130 and len(pids) == 2 and time.monotonic() - start < 30
    assert 'interrupted: stopping 2 running cell(s)' in stdout
    assert stdout.rstrip().endswith('stopped: finished cells are kept; run the same command again to resume')
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert (tmp_path / 'deit_tiny_w4a4_seed0' / 'result.json').read_text() == finished
    assert json.load(open(tmp_path / 'deit_tiny_w4a4_seed0' / 'cell.json'))['status'] == 'done'
    for f in ('swin_tiny_fp', 'swin_tiny_w4a4_seed0'):
        record = json.load(open(tmp_path / f / 'cell.json'))
        assert record['status'] == 'interrupted'
        # a token of its start: a job of an earlier SLURM submission of this cell, still ending, leaves it alone
        assert table_cells.superseded(record, '0' * 20) and record['token'] < table_cells.new_token()
        assert not os.path.exists(tmp_path / f / 'result.json')
    code, stdout, _ = reproduce_main(capsys, *argv, '--models', 'deit_tiny', 'swin_tiny', '--dry_run')
    assert '4 cells: 2 done, 2 to run, 0 blocked' in stdout and stdout.count('to run: interrupted last time') == 2


def _read(path):
    try:
        return open(path).read()
    except OSError:
        return ''


def test_a_failing_cell_is_reported_and_the_others_finish(data_dir, tmp_path, capsys, monkeypatch):
    """The real pipeline on the tiny conftest models: swin_test_tiny's checkpoint is not a checkpoint, so
    its cells fail with the entry script's one-line error, while vit_test_tiny's cells finish; the table
    marks the failed cells missing."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    ckpts = tmp_path / 'ckpts'
    os.makedirs(ckpts)
    save_random_checkpoint('vit_test_tiny', str(ckpts / 'vit_test_tiny.pth'))
    (ckpts / 'swin_test_tiny.pth').write_bytes(b'not a checkpoint')
    out = tmp_path / 'out'
    code, stdout, err = reproduce_main(
        capsys, '--data_dir', data_dir, '--output_dir', str(out), '--device', 'cpu', '--parallel', '2', '--script',
        TINY_ENTRY, '--models', 'vit_test_tiny', 'swin_test_tiny', '--bits', '4', '--checkpoint_dir', str(ckpts), '--',
        '--batch_size', '4', '--qwt_samples', '4', '--num_workers', '0', '--eval_workers', '0')
    assert code == 1, stdout + err
    bad = f'error: cannot read checkpoint {ckpts / "swin_test_tiny.pth"} ('
    for cell in ('swin_test_tiny FP', 'swin_test_tiny W4/A4 seed 0'):
        assert f'FAILED {cell} (exit 2) after ' in stdout
        assert f'failed: {cell}: {bad}' in stdout
    assert '2/4 done, 2 failed, 0 running' in stdout
    assert stdout.rstrip().endswith('2 cell(s) failed, 0 not run; fix them and run the same command again')
    for folder in ('swin_test_tiny_fp', 'swin_test_tiny_w4a4_seed0'):
        record = json.load(open(out / folder / 'cell.json'))
        assert record['status'] == 'failed' and record['returncode'] == 2 and record['last_line'].startswith(bad)
        assert not os.path.exists(out / folder / 'result.json')
    result = json.load(open(out / 'vit_test_tiny_w4a4_seed0' / 'result.json'))
    fp = json.load(open(out / 'vit_test_tiny_fp' / 'result.json'))
    assert (result['weights'], result['num_qwt'], len(result['qwt_blocks'])) == ('checkpoint', 4, 3)
    lines = (out / 'results_table.md').read_text().splitlines()
    assert len(lines) == 4  # rows of models outside the paper: by name
    assert lines[3] == (f"| vit_test_tiny | W4/A4 |  | {fp['fp_top1']:.2f} |  |  | {result['ptq_top1']:.2f} | "
                        f"{result['qwt_top1']:.2f} |  |  |  | 1 | 4 calibration images; 4 QwT images |")
    assert lines[2] == ('| swin_test_tiny | W4/A4 |  |  |  |  |  |  |  |  |  |  | missing: seed 0; missing: FP |')
    if figures.have_matplotlib():
        assert os.path.isfile(out / 'vit_test_tiny_w4a4_seed0' / 'r2.png')


def test_estimate_from_finished_cells():
    def cell(model, kind, seed=0):
        return table_cells.Cell(model, model, 'vit', kind, None if kind == 'fp' else 4, 4, seed, f'/x/{model}{kind}{seed}',
                              'script', ())
    deit_fp, deit_q, swin_fp, swin_q = cell('deit', 'fp'), cell('deit', 'quant'), cell('swin', 'fp'), cell('swin', 'quant')
    assert progress.estimate([deit_q], [], [], 2) is None  # nothing finished yet
    # only an FP cell timed: a quantized cell is guessed at least as long as it (a rough lower bound)
    assert progress.estimate([deit_q], [], [(deit_fp, 16.0)], 2) == (16.0, True)
    timed = [(deit_fp, 16.0), (deit_q, 80.0), (deit_q, 96.0), (swin_fp, 42.0)]
    # deit quantized: the mean 88 of its own cells, three of them on two slots: 264 / 2
    assert progress.estimate([deit_q] * 3, [], timed, 2) == (132.0, False)
    # swin quantized, never timed: 88 scaled by the FP cells, 42 / 16; one running for 100 s already
    job = local.Job(swin_q, 0, None, start=1000.0 - 100, started_at=0.0)
    left, rough = progress.estimate([swin_q, swin_q], [job], timed, 2, now=1000.0)
    assert not rough and left == pytest.approx((231.0 + 231.0 + 131.0) / 2)
    # a single long cell bounds the time from below, however many slots
    assert progress.estimate([swin_q], [], timed, 8)[0] == pytest.approx(231.0)


def test_estimate_is_never_below_the_longest_cell_left():
    """Finished: deit quantized 100 s, swin quantized 300 s. Left: deit, deit, swin on 4 slots: the sum 500
    spread over 4 slots is 125, but the swin cell alone takes 300. With swin running for 50 s (250 s left) and
    two deit cells to start: 450 / 4 = 112.5, but 250."""
    def cell(model, kind):
        return table_cells.Cell(model, model, 'vit', kind, None if kind == 'fp' else 4, 4, 0, f'/x/{model}{kind}',
                              'script', ())
    deit_q, swin_q = cell('deit', 'quant'), cell('swin', 'quant')
    timed = [(cell('deit', 'fp'), 10.0), (deit_q, 100.0), (cell('swin', 'fp'), 30.0), (swin_q, 300.0)]
    assert progress.estimate([deit_q, deit_q, swin_q], [], timed, 4) == (300.0, False)
    job = local.Job(swin_q, 0, None, start=1000.0 - 50, started_at=0.0)
    assert progress.estimate([deit_q, deit_q], [job], timed, 4, now=1000.0) == (250.0, False)


def test_the_digits_models_take_their_committed_weights_and_a_table_resnet_its_published_file(data_dir, tmp_path,
                                                                                               monkeypatch):
    """The digits models' weights ship with the repository: their cells run with no --checkpoint, with or
    without --checkpoint_dir; a table ResNet still needs its published file (pretrained_weights/ by default)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / 'empty')
    for extra in ([], ['--checkpoint_dir', str(tmp_path / 'empty')]):
        args = runner_flags.build_parser().parse_args(
            ['--data_dir', data_dir, '--models', 'resnet_digits', 'vit_digits', 'resnet18', '--bits', '4', '--device',
             'cpu', '--output_dir', str(tmp_path / 'out'), *extra])
        cells, _ = table_cells.plan(args, [])
        digits = [c for c in cells if c.model in ('resnet_digits', 'vit_digits')]
        assert len(digits) == 4 and all(c.blocked is None and '--checkpoint' not in c.flags for c in digits), extra
        folder = extra[1] if extra else os.path.join(str(tmp_path), 'pretrained_weights')
        assert [c.blocked for c in cells if c.model == 'resnet18'] == [
            f'resnet18: no resnet18_imagenet.pth.tar in {folder} (download {published_weights("resnet18").url})'] * 2


def test_a_missing_checkpoint_blocks_only_its_model(data_dir, tmp_path, capsys, env):
    monkeypatch, log = env
    ckpts = tmp_path / 'ckpts'
    os.makedirs(ckpts)
    (ckpts / 'deit_tiny_patch16_224-a1311bcf.pth').write_bytes(b'')  # the stand-in does not read it
    argv = cpu_args(data_dir, tmp_path / 'out', '--models', 'deit_tiny', 'swin_tiny', '--bits', '4', '--checkpoint_dir',
                    str(ckpts))
    code, stdout, _ = reproduce_main(capsys, *argv)
    assert code == 1 and sorted(r['key'] for r in runs(log)) == ['deit_tiny FP', 'deit_tiny W4/A4 seed 0']
    assert '  swin_tiny  W4/A4  seed 0   blocked: no checkpoint' in stdout
    reason = f'swin_tiny: no swin_tiny_patch4_window7_224.pth in {ckpts} (download https://github.com/'
    assert f'  blocked: {reason}' in stdout and f'not run (2 cells): {reason}' in stdout
    assert '| Swin-T | W4/A4 | 81.4 |  | 73.0 | 75.5 |  |  |  |  |  |  | missing: seed 0; missing: FP |' in stdout
    # the file arrives: only swin_tiny runs now
    (ckpts / 'swin_tiny_patch4_window7_224.pth').write_bytes(b'')
    code, stdout, _ = reproduce_main(capsys, *argv)
    assert code == 0 and sorted(r['key'] for r in runs(log)[2:]) == ['swin_tiny FP', 'swin_tiny W4/A4 seed 0']


def test_kill_9_of_the_runner_takes_its_cells_with_it(data_dir, tmp_path, env):
    """No orphans: the children die with the runner (PR_SET_PDEATHSIG), even after SIGKILL; the rerun then
    finds the cells interrupted, not running."""
    monkeypatch, _ = env
    monkeypatch.setenv('STAND_IN_SLEEP', '60')
    monkeypatch.setenv('STAND_IN_PID', '1')
    argv = cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4', '--parallel', '2')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tools', 'reproduce.py'), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids, deadline = [], time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [int(line.split()[1]) for f in ('deit_tiny_fp', 'deit_tiny_w4a4_seed0')
                for line in _read(tmp_path / f / 'console.txt').splitlines() if line.startswith('pid ')]
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(local.process_start_ticks(p) for p in pids):
        time.sleep(0.1)
    assert [local.process_start_ticks(p) for p in pids] == [None, None]  # gone (and reaped by init)
    cells, launch = table_cells.plan(runner_flags.build_parser().parse_args(argv))
    states = [table_cells.cell_state(c, launch, local.pid_alive)[:2] for c in cells]
    assert states == [('to run', 'interrupted last time')] * 2


def test_a_cell_running_in_another_runner_is_refused_in_one_line(data_dir, tmp_path, capsys, env):
    argv = cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--bits', '4')
    cells, launch = table_cells.plan(runner_flags.build_parser().parse_args(argv))
    import socket
    os.makedirs(cells[0].folder)
    table_cells.write_record(cells[0], launch, 'python x', status='running', started='2026-12-02 10:00:00',
                             pid=os.getpid(), pid_start=local.process_start_ticks(os.getpid()),
                             host=socket.gethostname())
    code, out, err = reproduce_main(capsys, *argv)
    assert code == 2 and runs(env[1]) == []
    assert err == (f'error: deit_tiny FP is running in another tools/reproduce.py (pid {os.getpid()} on '
                   f'{socket.gethostname()}, since 2026-12-02 10:00:00): wait for it to end, or stop it, then run '
                   'this command again\n')
    assert 'deit_tiny  FP              running: running since 2026-12-02 10:00:00' in out
    table_cells.write_record(cells[0], launch, 'python x', status='running', started='2026-12-02 10:00:00',
                             pid=os.getpid(), pid_start=1, host=socket.gethostname())  # the pid was reused since
    assert reproduce_main(capsys, *argv)[0] == 0


@pytest.mark.parametrize('argv,message', [
    (['--partition', 'gpu'], '--partition is for --backend slurm'),
    (['--no_wait'], '--no_wait is for --backend slurm'),
    (['--backend', 'slurm', '--time', '0'], '--time 0 must be positive'),
    (['--backend', 'slurm', '--time', '1:xx'], '--time 1:xx: expected minutes or [D-]HH:MM[:SS], e.g. 360 or 6:00:00'),
    (['--backend', 'slurm', '--slurm_opt', 'reservation'], '--slurm_opt reservation: expected KEY=VALUE, e.g. '
                                                           'reservation=mine'),
    (['--backend', 'slurm', '--parallel', '2'], '--parallel is for --backend local; use --array_parallelism for '
                                                'cells at a time'),
    (['--backend', 'slurm', '--array_parallelism', '0'], '--array_parallelism must be positive, got 0'),
])
def test_slurm_flags_are_checked_before_anything_is_submitted(data_dir, tmp_path, capsys, argv, message):
    code, out, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', *argv))
    assert code == 2 and out == '' and err == f'error: {message}\n'


def test_slurm_options_and_time_forms(data_dir, tmp_path):
    args = runner_flags.build_parser().parse_args(
        ['--data_dir', data_dir, '--backend', 'slurm', '--partition', 'gpu', '--time', '1-02:03:01', '--mem', '64G',
         '--cpus_per_task', '8', '--gpus_per_run', '2', '--slurm_opt', 'reservation=mine',
         '--slurm_opt=--exclusive=user', '--array_parallelism', '4', '--qos', 'high', '--account', 'lab', '--constraint', 'a100'])
    launch = runner_flags.make_launch(args)
    assert (launch.device, launch.procs, launch.backend, len(launch.slots)) == ('cuda', 2, 'slurm', 4)
    assert runner_flags.slurm_options(args, launch) == {
        'time': 24 * 60 + 2 * 60 + 3 + 1, 'partition': 'gpu', 'account': 'lab', 'qos': 'high', 'constraint': 'a100',
        'mem': '64G', 'cpus_per_task': 8, 'array_parallelism': 4, 'gpus_per_node': 2,
        'additional_parameters': {'reservation': 'mine', 'exclusive': 'user'}}
    assert [runner_flags.parse_time(t) for t in ('90', '1:30', '1:30:00', '0:00:01', '2-00:00')] == [90, 90, 90, 1, 2880]
    plain = runner_flags.build_parser().parse_args(['--data_dir', data_dir, '--backend', 'slurm', '--device', 'cpu'])
    assert runner_flags.slurm_options(plain, runner_flags.make_launch(plain)) == {'time': 360}  # 6 h by default


def test_slurm_backend_without_submitit_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'submitit', None)  # import submitit raises ImportError
    code, out, err = reproduce_main(capsys, *cpu_args(data_dir, tmp_path, '--models', 'deit_tiny', '--backend',
                                                      'slurm', '--dry_run'))
    assert code == 2 and out == ''
    assert err == ('error: --backend slurm needs submitit (small, pure Python): pip install submitit, or install '
                   'requirements.txt with its lock (README, Install)\n')


def test_stop_gives_ctrl_c_back_whatever_fails_while_stopping(monkeypatch):
    """stop() ignores a second Ctrl-C while it stops the children; a child that cannot be waited for must not
    leave this process deaf to Ctrl-C afterwards."""
    import types

    class Unwaitable:
        pid = 0

        def wait(self, timeout=None):
            raise OSError('wait failed')

    monkeypatch.setattr(local, '_signal_group', lambda proc, sig: None)  # no real process group to signal
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(OSError, match='wait failed'):
            local.stop([types.SimpleNamespace(proc=Unwaitable(), console=None, cell=None)], grace=0)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
