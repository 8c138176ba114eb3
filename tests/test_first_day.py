"""What a new user meets first: any timm input size, a GPU torch cannot use, a val/ of the wrong classes,
progress bars and log lines, quiet start-up, fast usage errors, and a log whose command re-runs."""
import io
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from conftest import ROOT, save_random_checkpoint
from utils.core import distributed
from utils.run import cli
from utils.run.demo import make_image_folder
from utils.core.errors import UserError


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet')), classes=3, train_per_class=4, val_per_class=2)


@pytest.fixture(scope='module')
def tiny_ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp('w')
    return {name: save_random_checkpoint(name, str(folder / f'{name}.pth')) for name in ('vit_test_tiny', 'swin_test_tiny')}


def tiny_run(family, root, ckpt, out, *extra):
    name = f'{family}_test_tiny'
    cli.main(family, ['--model', name, '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4', '--qwt_samples',
                      '8', '--num_workers', '0', '--eval_workers', '0', '--device', 'cpu', '--output_dir', out, *extra])
    return json.load(open(os.path.join(out, 'result.json')))


def fails(capsys, family, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(family, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err
    return err.splitlines()[-1]


# ---- 1. input size from timm's default_cfg ------------------------------------------------------

def test_384_model_runs_end_to_end(root, tmp_path):
    """vit_tiny_patch16_384 used to end in timm's 'Input image size (224*224) doesn't match model'."""
    from models import data_config, resolve_model
    cfg = data_config(resolve_model('vit_tiny_patch16_384'))
    assert (cfg['img_size'], cfg['crop_pct'], cfg['mean'], cfg['interpolation']) == (384, 1.0, (0.5,) * 3, 'bicubic')
    ckpt = save_random_checkpoint('vit_tiny_patch16_384', str(tmp_path / 'w.pth'))
    result = cli.main('vit', ['--model', 'vit_tiny_patch16_384', '--data_dir', root, '--checkpoint', ckpt,
                              '--allow_class_subset', '--batch_size', '2', '--qwt_samples', '2', '--num_val', '2',
                              '--eval', 'qwt', '--num_workers', '0', '--eval_workers', '0', '--device', 'cpu',
                              '--output_dir', str(tmp_path / 'out')])
    assert result['timm_name'] == 'vit_tiny_patch16_384' and result['qwt_top1'] in (0.0, 50.0, 100.0)
    assert len(result['qwt_blocks']) == 12


def test_table_models_keep_spec_transforms_and_others_take_timm_cfg():
    from models import data_config, resolve_model
    deit = data_config(resolve_model('deit_small'))
    assert (deit['img_size'], deit['crop_pct'], deit['mean']) == (224, 0.875, (0.485, 0.456, 0.406))  # timm says 0.9
    other = data_config(resolve_model('deit_base_patch16_384'))
    assert (other['img_size'], other['crop_pct'], other['std']) == (384, 1.0, (0.229, 0.224, 0.225))
    swin = data_config(resolve_model('swin_base_patch4_window12_384'))
    assert (swin['img_size'], swin['crop_pct']) == (384, 1.0)


# ---- 2. a GPU torch cannot use -------------------------------------------------------------------

def test_gpu_visible_but_unusable_is_an_error(monkeypatch, capsys, root, tiny_ckpts, tmp_path):
    monkeypatch.setattr(distributed, 'gpu_visible_to_system', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.version, 'cuda', None)
    with pytest.raises(UserError) as info:
        distributed.resolve_device(None)
    assert str(info.value) == (f"an NVIDIA GPU is visible to the system, but torch {torch.__version__} cannot use it "
                               "(a CPU-only build): install the torch build for your driver (README, Install), or "
                               "pass --device cpu to run on the CPU anyway (a full run there takes hours)")
    assert distributed.resolve_device('cpu') == (torch.device('cpu'), '')  # --device cpu still forces the CPU
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    line = fails(capsys, 'vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint',
                                 tiny_ckpts['vit_test_tiny'], '--output_dir', str(tmp_path), '--device', 'cuda'])
    assert line.startswith('error: --device cuda: an NVIDIA GPU is visible to the system, but torch ')
    assert '(built for CUDA 13.0, which may need a newer NVIDIA driver than this one)' in line


def test_no_gpu_anywhere_means_the_cpu(monkeypatch):
    monkeypatch.setattr(distributed, 'gpu_visible_to_system', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert distributed.resolve_device(None) == (torch.device('cpu'), '')


# ---- 3. class folders against the model's classes -------------------------------------------------

def test_val_with_other_classes_than_the_model_is_refused(capsys, tmp_path, tiny_ckpts):
    data = make_image_folder(str(tmp_path / 'd'), classes=4, train_per_class=4, val_per_class=1)
    argv = ['--model', 'vit_test_tiny', '--data_dir', data, '--checkpoint', tiny_ckpts['vit_test_tiny'],
            '--batch_size', '4', '--qwt_samples', '8', '--num_workers', '0', '--output_dir', str(tmp_path / 'o')]
    line = fails(capsys, 'vit', argv)
    assert line == (f"error: {data}/val has 4 class folders, but vit_test_tiny predicts 3 classes: labels are folder "
                    "indices, so accuracy would be scored against the wrong labels. Use the full ImageNet layout "
                    "(3 synset folders), or pass --allow_class_subset")
    os.rename(os.path.join(data, 'val', 'n00000003'), str(tmp_path / 'moved'))
    assert fails(capsys, 'vit', argv).startswith(f'error: {data}/train has 4 class folders')  # train/ too
    result = cli.main('vit', [*argv, '--allow_class_subset', '--eval', 'none'])
    assert result['num_qwt'] == 8


# ---- 4. progress bars and log lines ------------------------------------------------------------------

def rendered_lines(text):
    """What a terminal shows: each line as left by its last carriage return."""
    return [line.split('\r')[-1] for line in text.split('\n')]


def test_log_lines_never_share_a_line_with_a_bar(root, tiny_ckpts, tmp_path):
    """Bars (stderr) and log lines (stdout) on one terminal: every log line stands alone; the Swin QwT
    bar counts the 4 blocks the log counts, not the 5 steps with PatchMerging."""
    buf = io.StringIO()
    buf.isatty = lambda: True
    with redirect_stdout(buf), redirect_stderr(buf):
        result = tiny_run('swin', root, tiny_ckpts['swin_test_tiny'], str(tmp_path / 'o'))
    text = buf.getvalue()
    assert 'RepQ-ViT calibration:' in text and 'QwT:' in text  # the bars were drawn
    blocks = [line for line in rendered_lines(text) if 'QwT block' in line]
    assert len([line for line in blocks if ': r2 ' in line]) == 4  # and block 0's singular-fit warning
    for line in blocks:  # a warning is marked as one (issue 24), an INFO line is not
        assert re.fullmatch(r'\d\d:\d\d:\d\d (QwT block \d: r2 |WARNING: QwT block 0: the float32 inverse).*', line), line
    assert result['warnings'] == 1
    log = open(os.path.join(str(tmp_path / 'o'), 'log.txt')).read()
    assert len(re.findall(r'^\d\d:\d\d:\d\d WARNING: ', log, re.M)) == 1
    assert re.search(r'^\d\d:\d\d:\d\d 1 warning\(s\) above: the lines marked WARNING \(also in log.txt\)$', log, re.M)
    qwt_totals = {total for _, total in re.findall(r'QwT:\s+\d+%\|[^|]*\| (\d+)/(\d+)', text)}
    assert qwt_totals == {'4'}
    # patch_embed, 4 blocks x (qkv, proj, matmul1, matmul2, fc1, fc2), the PatchMerging reduction, the head
    calib_totals = {total for _, total in re.findall(r'RepQ-ViT calibration:\s+\d+%\|[^|]*\| (\d+)/(\d+)', text)}
    assert calib_totals == {str(1 + 4 * 6 + 1 + 1)}


def test_in_a_file_progress_is_a_few_whole_lines(root, tiny_ckpts, tmp_path):
    """Output to a file (console.txt, a SLURM log): no carriage returns; each stage's progress is whole lines
    (start, tenths, end) and the log lines stand alone."""
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        tiny_run('swin', root, tiny_ckpts['swin_test_tiny'], str(tmp_path / 'o'))
    text = buf.getvalue()
    assert '\r' not in text
    lines = text.splitlines()
    assert 'QwT: 0/4 block (0 %), started' in lines and 'RepQ-ViT calibration: 0/27 layer (0 %), started' in lines
    assert any(re.fullmatch(r'QwT: 4/4 block \(100 %\), [\d.]+ s, done', line) for line in lines)
    assert sum(bool(re.fullmatch(r'\d\d:\d\d:\d\d QwT block \d: r2 .*', line)) for line in lines) == 4
    assert len([line for line in lines if line.startswith('RepQ-ViT calibration: ')]) <= 12


# ---- 5. quiet start-up and fast usage errors -------------------------------------------------------

def test_usage_error_answers_without_importing_torch():
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            "sys.argv = ['qwt_vit_and_deit.py', '--model', 'deit_tiny', '--data_dir', '.', '--w_bit', '1']; "
            "runpy.run_path('qwt_vit_and_deit.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ['error: --w_bit 1 not supported: use 2 to 8']
    assert proc.stdout.strip() == 'torch imported: False'


@pytest.mark.parametrize('family,name,listed,absent', [
    ('swin', 'swin_tny', 'use one of swin_tiny, swin_small or a timm 0.4.12 swin name', 'deit_tiny'),
    ('vit', 'deit_smal', 'use one of vit_small, vit_base, deit_tiny,', 'swin_tiny'),
])
def test_unknown_model_lists_the_scripts_own_models(capsys, root, family, name, listed, absent):
    line = fails(capsys, family, ['--model', name, '--data_dir', root])
    assert f"unknown model '{name}': {listed}" in line and absent not in line


def test_known_timm_warnings_are_filtered_and_nothing_else():
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        cli.quiet_known_warnings()
        warnings.warn('`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.',
                      FutureWarning)
        warnings.warn('torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.',
                      UserWarning)
        warnings.warn('torch.meshgrid: something else', UserWarning)
        warnings.warn('`torch.jit.script` is deprecated.', DeprecationWarning)
        warnings.warn('fast_hadamard_transform package not found, using standard pytorch kernels', UserWarning)
        warnings.warn('fast_hadamard_transform package not found, using standard pytorch kernels', FutureWarning)
    assert [str(w.message) for w in seen] == ['torch.meshgrid: something else', '`torch.jit.script` is deprecated.',
                                              'fast_hadamard_transform package not found, using standard pytorch kernels']


def test_the_brevitas_warning_filtered_is_the_one_brevitas_raises():
    """The --ptq methods import brevitas, whose brevitas.graph.equalize warns at import without the optional
    fast_hadamard_transform package: the filter's text is the installed brevitas's own (its source, read, not
    imported)."""
    import importlib.util
    import re
    package = importlib.util.find_spec('brevitas').submodule_search_locations[0]  # imports nothing of brevitas
    source = open(os.path.join(package, 'graph', 'equalize.py')).read()
    raised = re.findall(r'warnings\.warn\("(fast_hadamard_transform[^"]*)"\)', source)
    assert raised and all(any(category is UserWarning and re.match(pattern, text)
                              for category, pattern in cli.KNOWN_WARNINGS) for text in raised)


# ---- 6. a log that can be replayed -------------------------------------------------------------------

def test_logged_command_is_quoted_and_reruns(tmp_path, tiny_ckpts):
    data = make_image_folder(str(tmp_path / "my data's folder"), classes=3, train_per_class=4, val_per_class=2)
    out = str(tmp_path / 'out dir')
    first = tiny_run('vit', data, tiny_ckpts['vit_test_tiny'], out)
    assert first['data_dir'] == os.path.abspath(data) and first['checkpoint'] == os.path.abspath(tiny_ckpts['vit_test_tiny'])
    line = [ln for ln in open(os.path.join(out, 'log.txt')) if ' ==== ' in ln][-1]
    argv = shlex.split(line.split(' ==== ', 1)[1])
    assert argv[:2] == ['python', 'qwt_vit_and_deit.py'] and data in argv and out in argv
    again = cli.main('vit', argv[2:])
    assert {k: v for k, v in again.items() if k != 'timings'} == {k: v for k, v in first.items() if k != 'timings'}


def test_flag_choices_are_the_librarys():
    """utils/run/cli.py names the choices without importing the library (and torch): they must stay equal."""
    from quant.qwt import ACCUMULATE
    from quant.regression import SOLVERS
    assert set(cli.SOLVER_CHOICES) == set(SOLVERS) and set(cli.ACCUMULATE_CHOICES) == set(ACCUMULATE)
    args = cli.parse_args('vit', ['--model', 'deit_tiny', '--data_dir', ROOT])
    assert (args.num_workers, args.qwt_solver, args.qwt_accumulate, args.calib_search, args.eval) == \
        (4, 'inverse', 'concat', 'vectorized', 'both')


def test_eval_fp_scores_the_float_model(root, tiny_ckpts, tmp_path):
    """--eval fp: top-1 of the full-precision model, no calibration; checked against plain timm and
    torchvision calls on the same val images."""
    import timm
    from PIL import Image
    from timm.data import ImageDataset
    from torchvision import transforms as T
    result = cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', tiny_ckpts['vit_test_tiny'],
                              '--eval', 'fp', '--eval_workers', '0', '--device', 'cpu', '--output_dir',
                              str(tmp_path / 'o')])
    assert result['eval'] == 'fp' and result['ptq_top1'] is None and result['num_calib'] is None
    assert result['ptq_size_mb'] is None and result['fp_size_mb'] > 0
    model = timm.create_model('vit_test_tiny', pretrained=False)
    model.load_state_dict(torch.load(tiny_ckpts['vit_test_tiny']))
    tf = T.Compose([T.Resize(int(32 / 0.9), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    val = ImageDataset(os.path.join(root, 'val'), transform=tf)
    with torch.no_grad():
        hits = sum(int(model.eval()(img[None]).argmax()) == target for img, target in val)
    assert result['fp_top1'] == pytest.approx(100 * hits / len(val)) and len(val) == 6


@pytest.mark.parametrize('message,one_line', [('operator torchvision::nms does not exist', True),
                                              ('some other failure', False)])
def test_torchvision_built_for_another_torch_is_one_line_with_the_fix(tmp_path, message, one_line):
    """A torchvision whose operators fail to register (built for another torch) stops with the pair to
    reinstall; any other import failure keeps its traceback."""
    fake = tmp_path / 'torchvision'
    fake.mkdir()
    (fake / '__init__.py').write_text(f'raise RuntimeError({message!r})\n')
    proc = subprocess.run([sys.executable, 'qwt_vit_and_deit.py', '--demo'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': str(tmp_path), 'PYTHONWARNINGS': 'ignore'})
    if not one_line:
        assert proc.returncode == 1 and 'Traceback' in proc.stderr and proc.stderr.rstrip().endswith(message)
        return
    base, _, tag = torch.__version__.partition('+')
    index = f' --index-url https://download.pytorch.org/whl/{tag}' if tag else ''
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert re.fullmatch(rf'error: torchvision \S+ does not fit torch {re.escape(torch.__version__)} \({message}\): '
                        rf'install them as a pair from one index, e\.g\. pip install --force-reinstall '
                        rf'torch=={re.escape(base)} torchvision{re.escape(index)}', proc.stderr.strip())


@pytest.mark.parametrize('torch_version,vision_version,fix', [
    ('2.13.0+cpu', '0.28.0', 'torch==2.13.0 torchvision --index-url https://download.pytorch.org/whl/cpu'),
    ('2.5.0', '0.19.0', 'torch==2.5.0 torchvision'),
])
def test_torchvision_fix_names_the_index_of_the_torch_build(torch_version, vision_version, fix):
    assert cli.mismatched_torchvision('operator torchvision::nms does not exist', torch_version, vision_version) == (
        f'torchvision {vision_version} does not fit torch {torch_version} (operator torchvision::nms does not '
        f'exist): install them as a pair from one index, e.g. pip install --force-reinstall {fix}')
