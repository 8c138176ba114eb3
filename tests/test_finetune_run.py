"""QwT* in the entry scripts (issue 28): the flags' bad input (one line, nothing written), and whole runs of a
tiny model through the pipeline: records, --eval all's four variants, --save/--load of the fine-tuned model, and
a rerun in the same folder resuming from the checkpoint."""
import json
import os

import pytest
import torch

from conftest import save_random_checkpoint
from utils.run import cli
from utils.run.demo import make_image_folder
from utils.run.finetune_flags import CHECKPOINT_FILE


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A 3-class image folder and a random vit_test_tiny checkpoint."""
    tmp = tmp_path_factory.mktemp('qwtstar')
    root = make_image_folder(str(tmp / 'data'), classes=3, train_per_class=8, val_per_class=2)
    return root, save_random_checkpoint('vit_test_tiny', str(tmp / 'tiny.pth'))


def flags(tiny, out, *extra):
    root, ckpt = tiny
    return ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4',
            '--qwt_samples', '8', '--num_workers', '0', '--eval_workers', '0', '--device', 'cpu',
            '--output_dir', str(out), *extra]


def fails(capsys, family, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(family, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err and len(err.splitlines()) >= 1
    return err.splitlines()[-1]


@pytest.mark.parametrize('extra,message', [
    (['--finetune_epochs', '-1'], '--finetune_epochs -1 is negative: use 0 (QwT as published) or 1 (QwT*)'),
    (['--finetune_epochs', '1', '--finetune_lr', '0'], '--finetune_lr 0 must be > 0: use e.g. 0.001'),
    (['--finetune_epochs', '1', '--finetune_lr', '-0.5'], '--finetune_lr -0.5 must be > 0'),
    (['--finetune_epochs', '1', '--finetune_batch_size', '0'], '--finetune_batch_size 0 must be >= 1'),
    (['--finetune_epochs', '1', '--checkpoint_every', '0'], '--checkpoint_every 0 must be >= 1'),
    (['--finetune_epochs', '1', '--smoothing', '0.1'], '--smoothing smooths labels: it needs --finetune_loss label'),
])
def test_bad_flags_are_one_line_and_nothing_is_written(capsys, tmp_path, tiny, extra, message):
    line = fails(capsys, 'vit', flags(tiny, tmp_path / 'out', *extra))
    assert message in line and line.startswith('usage: ') is False
    assert not os.path.exists(tmp_path / 'out')


def test_finetune_after_load_of_a_model_without_qwt(capsys, tmp_path, tiny):
    from quant.saved_model import FORMAT, VERSION
    path = str(tmp_path / 'repq.pth')
    torch.save({'format': FORMAT, 'version': VERSION, 'model': 'x', 'timm_name': 'vit_test_tiny', 'w_bits': 4,
                'a_bits': 4, 'compensated': False, 'state_dict': {}, 'meta': {}}, path)
    line = fails(capsys, 'vit', ['--load', path, '--data_dir', tiny[0], '--device', 'cpu', '--output_dir',
                                 str(tmp_path / 'out'), '--finetune_epochs', '1'])
    assert line == (f'error: --finetune_epochs 1 with --load {path}: the file holds a model without QwT (nothing to '
                    'fine-tune); --save a model after QwT, or leave out --finetune_epochs')
    assert not os.path.exists(tmp_path / 'out')


def test_a_train_folder_without_labels_for_the_models_classes(capsys, tmp_path, tiny):
    root = make_image_folder(str(tmp_path / 'five'), classes=5, train_per_class=4, val_per_class=1)
    out = tmp_path / 'out'
    line = fails(capsys, 'vit', flags((root, tiny[1]), out, '--allow_class_subset', '--finetune_epochs', '1'))
    assert line == (f"error: {root}/train has 5 class folders, but vit_test_tiny predicts 3 classes: QwT* fine-tuning "
                    "trains on folder-index labels; use a train/ with the model's classes")
    assert not os.path.exists(out / 'result.json') and not os.path.exists(out / CHECKPOINT_FILE)


# ---- whole runs of the tiny model (one module fixture, shared) --------------------------------------

FINETUNE = ('--finetune_epochs', '1', '--finetune_images', '16', '--finetune_batch_size', '4', '--checkpoint_every', '2',
            '--finetune_lr', '1e-3')


def run_json(argv):
    """Run the entry point in-process; its result.json."""
    result = cli.main('vit', list(argv))
    out = argv[argv.index('--output_dir') + 1]
    with open(os.path.join(out, 'result.json')) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    return result


@pytest.fixture(scope='module')
def runs(tiny, tmp_path_factory):
    """The same tiny run without and with QwT* (--eval all, --save), and a --load of the fine-tuned file."""
    tmp = tmp_path_factory.mktemp('runs')
    qwt = run_json(flags(tiny, tmp / 'qwt', '--eval', 'all', '--save', str(tmp / 'qwt.pth')))
    star_argv = flags(tiny, tmp / 'star', '--eval', 'all', '--save', str(tmp / 'star.pth'), *FINETUNE)
    star = run_json(star_argv)
    loaded = run_json(['--load', str(tmp / 'star.pth'), '--data_dir', tiny[0], '--device', 'cpu', '--eval', 'qwt',
                       '--eval_workers', '0', '--output_dir', str(tmp / 'loaded')])
    return {'qwt': qwt, 'star': star, 'loaded': loaded, 'tmp': tmp, 'star_argv': star_argv}


def test_qwtstar_records_and_the_four_variants(runs):
    qwt, star = runs['qwt'], runs['star']
    for key in ('fp_top1', 'ptq_top1', 'qwt_top1', 'fp_top5', 'ptq_top5', 'qwt_top5', 'qwt_blocks', 'calib_files',
                'qwt_files'):
        assert star[key] == qwt[key], key  # PTQ and QwT untouched by the fine-tuning that follows them
    assert qwt['qwtstar_top1'] is None and qwt['finetune'] is None
    assert isinstance(star['qwtstar_top1'], float) and isinstance(star['qwtstar_top5'], float)
    ft = star['finetune']
    assert (ft['steps'], ft['images_seen'], ft['resumed_from']) == (16 // 4, 16, None)
    assert ft['recipe']['epochs'] == 1 and ft['recipe']['max_images'] == 16 and ft['recipe']['lr'] == 1e-3
    assert ft['recipe']['loss'] == 'distill' and ft['seconds'] > 0
    assert [s for s, _ in ft['loss_curve']][-1] == 4 and len(ft['loss_curve']) <= 20
    assert star['timings']['finetune'] > 0


def test_the_saved_files_differ_exactly_in_w_b_and_the_head(runs):
    """The fine-tuned file carries the trained W, b and head; every other tensor (weights, quantizer scales and
    zero points, LayerNorms) is bit-identical to the QwT file of the same run."""
    tmp = runs['tmp']
    a = torch.load(tmp / 'qwt.pth', weights_only=False)['state_dict']
    b = torch.load(tmp / 'star.pth', weights_only=False)
    assert b['meta']['finetune']['steps'] == 4
    b = b['state_dict']
    assert a.keys() == b.keys()
    trainable = {k for k in a if k.endswith(('comp_weight', 'comp_bias'))} | {'head.weight', 'head.bias'}
    assert len([k for k in trainable if k.endswith('comp_weight')]) == 3 and trainable <= a.keys()
    assert any(k.startswith('head.') and 'quantizer' in k for k in a)  # the head's scales: frozen, compared below
    assert [k for k in a if k not in trainable and not torch.equal(a[k], b[k])] == []
    assert [k for k in trainable if torch.equal(a[k], b[k])] == []  # every one trained, zero-initialised ones too


def test_load_of_a_fine_tuned_file_reports_qwtstar(runs):
    loaded, star = runs['loaded'], runs['star']
    assert loaded['qwtstar_top1'] == star['qwtstar_top1'] and loaded['qwtstar_top5'] == star['qwtstar_top5']
    assert loaded['qwt_top1'] is None and loaded['finetune']['steps'] == 4


def test_a_rerun_in_the_same_folder_resumes_from_the_checkpoint(runs, capsys):
    """The same command again: its checkpoint says the fine-tuning is done at step 4 of 4, so nothing is trained
    again and the result is the same; the log says so."""
    capsys.readouterr()
    again = run_json(runs['star_argv'])
    assert 'resuming QwT* from step 4 of 4' in capsys.readouterr().out
    assert again['qwtstar_top1'] == runs['star']['qwtstar_top1'] and again['finetune']['resumed_from'] == 4
    assert again['finetune']['steps'] == 4 and again['finetune']['loss_curve'] == runs['star']['finetune']['loss_curve']


# ---- a SLURM cell killed while fine-tuning, requeued: the same command in the same folder resumes ----------

ENTRY = '''import sys
sys.path[:0] = [{root!r}, {tests!r}]
import conftest  # registers vit_test_tiny with timm in this process
from utils.run.cli import main
main('vit')
'''
LONG = ('--finetune_epochs', '3', '--finetune_batch_size', '4', '--checkpoint_every', '2', '--eval', 'qwt',
        '--finetune_lr', '1e-3')


def _cell(tiny, folder, script):
    from utils.runner.cells import Cell
    return Cell('vit_test_tiny', 'vit_test_tiny', 'vit', 'quant', 4, 4, 0, str(folder), script,
                tuple(flags(tiny, folder, *LONG, '--save', str(folder / 'model.pth'))))


def test_a_requeued_slurm_cell_resumes_fine_tuning_and_ends_as_an_uninterrupted_run(tiny, tmp_path):
    """utils.runner.slurm.CellJob, the callable of every SLURM job, SIGKILLed once the first checkpoint is written
    (as a preempted job), then run again as SLURM's requeue does (SLURM_RESTART_COUNT=1): the same command in the
    same folder resumes from the checkpoint and ends with the weights and result of a run never stopped."""
    import signal
    import subprocess
    import sys
    import time
    from utils.runner.flags import Launch
    from utils.runner.slurm import CellJob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / 'entry.py'
    script.write_text(ENTRY.format(root=root, tests=os.path.join(root, 'tests')))
    launch = Launch('cpu', (None,), 1, 1, 'slurm')
    env = {'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    cell = _cell(tiny, tmp_path / 'cell', str(script))
    job = subprocess.Popen([sys.executable, '-c', 'import pickle, sys; pickle.load(sys.stdin.buffer)()'],
                           stdin=subprocess.PIPE, cwd=root, env={**os.environ, **env}, start_new_session=True)
    import pickle
    job.stdin.write(pickle.dumps(CellJob(cell, launch, env)))
    job.stdin.close()
    checkpoint = tmp_path / 'cell' / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert checkpoint.exists() and not (tmp_path / 'cell' / 'result.json').exists(), 'killed too late'
    os.environ['SLURM_RESTART_COUNT'] = '1'
    try:
        assert CellJob(cell, launch, env)() == 0
    finally:
        del os.environ['SLURM_RESTART_COUNT']
    console = (tmp_path / 'cell' / 'console.txt').read_text()
    step = int(console.split('resuming QwT* from step ')[1].split()[0])
    assert 2 <= step < 18 and step % 2 == 0  # 3 epochs of 24 images in batches of 4
    run_json(list(_cell(tiny, tmp_path / 'ref', str(script)).flags))  # the uninterrupted run, in this process
    a, b = (json.load(open(tmp_path / f / 'result.json')) for f in ('cell', 'ref'))
    assert a['finetune']['resumed_from'] == step and b['finetune']['resumed_from'] is None
    assert (a['qwtstar_top1'], a['finetune']['steps'], a['finetune']['loss_curve']) == \
        (b['qwtstar_top1'], b['finetune']['steps'], b['finetune']['loss_curve'])
    sa, sb = (torch.load(tmp_path / f / 'model.pth', weights_only=False)['state_dict'] for f in ('cell', 'ref'))
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert json.load(open(tmp_path / 'cell' / 'cell.json'))['runs'] == 2


def test_short_curve_keeps_evenly_spaced_points_and_the_last():
    from utils.run.finetune_stage import short_curve
    curve = [(s, s / 10) for s in range(1, 101)]
    short = short_curve(curve, points=5)
    assert short == [[1, 0.1], [26, 2.6], [51, 5.1], [75, 7.5], [100, 10.0]]  # indices round(i * 99 / 4)
    assert short_curve(curve[:3], points=5) == [[1, 0.1], [2, 0.2], [3, 0.3]]


def test_wrap_gives_each_variant_its_state():
    """PTQ and PTQ + QwT read the QwT state, QwT* the fine-tuned one, FP neither; the model is left as the last
    variant set it."""
    from utils.run.finetune_stage import Tuned
    p = torch.nn.Parameter(torch.zeros(2))
    tuned = Tuned({'w': p}, {'w': torch.tensor([1., 1.])}, {'w': torch.tensor([5., 5.])}, None)
    seen = {}
    fn = {name: (lambda x, name=name: seen.setdefault(name, p.detach().clone())) for name in ('fp', 'repq', 'qwt',
                                                                                          'qwtstar')}
    with torch.no_grad():
        p.fill_(9.)
    for name, f in tuned.wrap(fn).items():
        f(None)
    assert seen['fp'].tolist() == [9., 9.] and seen['repq'].tolist() == [1., 1.]
    assert seen['qwt'].tolist() == [1., 1.] and seen['qwtstar'].tolist() == [5., 5.]


def test_flags_after_reproduce_dashes_reach_every_cell_and_fp_cells_do_not_fine_tune(tiny):
    """tools/reproduce.py ... -- --finetune_epochs 1 gives the flag to every cell, its --eval fp cells included:
    those are accepted and fine-tune nothing (there is no quantized model)."""
    from utils.run.finetune_flags import finetuning
    from utils.runner.flags import check_extra
    check_extra(['--finetune_epochs', '1', '--finetune_lr', '3e-4'], ('vit', 'swin', 'resnet'))
    parser = cli.build_parser('vit', raise_errors=True)
    fp = parser.parse_args(['--model', 'deit_tiny', '--data_dir', tiny[0], '--eval', 'fp', '--finetune_epochs', '1'])
    cli.check_args(fp, 'vit', 1)
    quant = parser.parse_args(['--model', 'deit_tiny', '--data_dir', tiny[0], '--finetune_epochs', '1'])
    assert not finetuning(fp) and finetuning(quant) and not finetuning(parser.parse_args(['--model', 'deit_tiny']))
