"""qwt_resnet.py: its command line and one-line errors before anything heavy, the published weights files,
the opt-in real A-bit convolution inputs, the published script's own images (capture == --dump_inputs), and
tools/reproduce.py's ResNet-18 row against the published 58.3 / 68.9. Random weights, tiny folders."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, side_by_side, make_tiny_resnet
from utils.core.errors import UserError
from utils.run import cli
from utils.run.demo import make_image_folder
from utils.run.weights import RESNET_WEIGHTS, find_weights

PUBLISHED = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'published-qwt'))
PUBLISHED_SCRIPT = os.path.join(PUBLISHED, 'qwt_resnet_group_conv_only_percentile.py')


def random_resnet_state(timm_name):
    import timm
    from models import randomize_batchnorms
    torch.manual_seed(0)
    return randomize_batchnorms(timm.create_model(timm_name, pretrained=False)).state_dict()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """data/ (3 classes x 4 train, 1 val image each) and ckpt/ with random resnet18 weights under the
    published file name."""
    tmp = tmp_path_factory.mktemp('resnet')
    make_image_folder(str(tmp / 'data'), classes=3, train_per_class=4, val_per_class=1, size=(24, 32))
    (tmp / 'ckpt').mkdir()
    torch.save(random_resnet_state('resnet18'), tmp / 'ckpt' / 'resnet18_imagenet.pth.tar')
    return tmp


def usage_error(capsys, family, argv):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(family, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


# ---- command line -----------------------------------------------------------------------------------

def test_published_command_line_and_defaults(folder):
    a = cli.parse_args('resnet', ['--model', 'resnet18', '--data_dir', str(folder / 'data'), '--w_bit', '6',
                                  '--a_bits', '6', '--start_block', '2', '--checkpoint_dir', str(folder / 'ckpt'),
                                  '--local-rank', '0'])
    assert (a.w_bits, a.a_bits, a.start_block, a.local_rank) == (6, 6, 2, 0)
    # SPEC §3b: kernel 1, factor 64, batch 32, 4 workers, seed 0, the published 8-bit conv inputs
    assert (a.kernel_size, a.factor, a.batch_size, a.num_workers, a.seed) == (1, 64, 32, 4, 0)
    assert (a.conv_a_bits, a.qwt_samples, a.eval) == ('8', 512, 'both')
    help_text = ' '.join(cli.build_parser('resnet').format_help().split())
    assert 'Percentile post-training quantization, then QwT group-convolution compensation' in help_text
    assert "--conv_a_bits {8,a_bits}" in help_text and 'W4/A8 and W6/A8 in effect' in help_text
    assert '--kernel_size' not in cli.build_parser('vit').format_help()


@pytest.mark.parametrize('args,message', [
    (['--kernel_size', '2'], '--kernel_size 2 must be odd and >= 1 (padding kernel_size // 2 keeps the block\'s '
                             'output size only for odd kernels): use 3'),
    (['--kernel_size', '0'], '--kernel_size 0 must be odd and >= 1'),
    (['--factor', '0'], '--factor 0 must be >= 1 (input channels per QwT group): use 64, as published'),
    (['--qwt_solver', 'lstsq'], '--qwt_solver lstsq: QwT for ResNets has the published ridge inverse only; leave '
                                'out --qwt_solver'),
    (['--model', 'deit_tiny'], '--model deit_tiny is a vit model: run it with qwt_vit_and_deit.py'),
    (['--model', 'swin_tiny'], '--model swin_tiny is a swin model: run it with qwt_swin.py'),
    (['--model', 'resnet34'], "unknown model 'resnet34': Percentile + QwT supports resnet18, resnet50 and resnet101"),
])
def test_bad_flags_are_one_line_errors(folder, capsys, args, message):
    argv = ['--model', 'resnet18', '--data_dir', str(folder / 'data'), '--checkpoint_dir', str(folder / 'ckpt'), *args]
    assert message in usage_error(capsys, 'resnet', argv)


def test_resnet_to_the_other_scripts_names_qwt_resnet(folder, capsys):
    for family in ('vit', 'swin'):
        line = usage_error(capsys, family, ['--model', 'resnet101', '--data_dir', str(folder / 'data')])
        assert line.endswith('--model resnet101 is a resnet model: run it with qwt_resnet.py')


# ---- weights ----------------------------------------------------------------------------------------

def test_published_weights_names_and_places(folder, tmp_path, monkeypatch):
    assert {k: w.file for k, w in RESNET_WEIGHTS.items()} == {
        'resnet18': 'resnet18_imagenet.pth.tar', 'resnet50': 'resnet50_imagenet.pth.tar',
        'resnet101': 'resnet101-63fe2227.pth'}
    ckpt = str(folder / 'ckpt' / 'resnet18_imagenet.pth.tar')
    assert find_weights('resnet18', checkpoint_dir=str(folder / 'ckpt'), cwd=str(tmp_path)) == ckpt
    assert find_weights('resnet18', checkpoint=ckpt, cwd=str(tmp_path)) == ckpt
    # the published script's place: pretrained_weights/ under the working folder
    (tmp_path / 'pretrained_weights').mkdir()
    (tmp_path / 'pretrained_weights' / 'resnet101-63fe2227.pth').write_bytes(b'')
    assert find_weights('resnet101', cwd=str(tmp_path)) == str(tmp_path / 'pretrained_weights' /
                                                                   'resnet101-63fe2227.pth')
    with pytest.raises(UserError) as e:
        find_weights('resnet50', checkpoint_dir=str(folder / 'ckpt'), cwd=str(tmp_path))
    assert str(e.value) == (
        f"resnet50_imagenet.pth.tar not found in {folder / 'ckpt'}/ or {tmp_path / 'pretrained_weights'}/: download it "
        "from https://github.com/yhhhli/BRECQ/releases/download/v1.0/resnet50_imagenet.pth.tar (BRECQ release v1.0, "
        "as the published README says) into one of them, or pass --checkpoint FILE (nothing is downloaded)")


def test_missing_weights_file_is_one_line_before_anything_runs(folder, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    line = usage_error(capsys, 'resnet', ['--model', 'resnet18', '--data_dir', str(folder / 'data')])
    assert line.endswith(f"resnet18_imagenet.pth.tar not found in {tmp_path}/pretrained_weights/: download it from "
                         "https://github.com/yhhhli/BRECQ/releases/download/v1.0/resnet18_imagenet.pth.tar (BRECQ "
                         "release v1.0, as the published README says) into one of them, or pass --checkpoint FILE "
                         "(nothing is downloaded)")


def test_weights_that_do_not_fit_and_a_factor_that_does_not_split_fail_before_any_data(folder, tmp_path, capsys,
                                                                                        monkeypatch):
    from utils.run import pipeline
    monkeypatch.setattr(pipeline, 'open_splits', lambda *a: pytest.fail('data read before the check'))
    bad = tmp_path / 'resnet18_imagenet.pth.tar'
    state = random_resnet_state('resnet18')
    state['fc.weight'] = state['fc.weight'][:10]
    del state['layer4.1.bn2.bias']
    torch.save(state, bad)
    base = ['--model', 'resnet18', '--data_dir', str(folder / 'data'), '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as exc:
        cli.main('resnet', [*base, '--checkpoint', str(bad)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint {bad} does not fit resnet18: missing keys layer4.1.bn2.bias; shapes (checkpoint vs model) "
        "fc.weight (10, 512) vs (1000, 512). Pass the weights of this model, or the --model they were trained as")
    # 96 channels per group: resnet18's 64-channel blocks get 1 group, its 128-channel ones 1, 256: 2, 512: 5,
    # which does not split 512
    with pytest.raises(SystemExit):
        cli.main('resnet', [*base, '--checkpoint_dir', str(folder / 'ckpt'), '--factor', '96'])
    err = capsys.readouterr().err.strip()
    assert err == ('error: --factor 96 makes 5 groups of 512 input channels, which do not split 512 input and 512 '
                   'output channels evenly: use a factor that divides the channel counts, such as 64 (published '
                   'default)')


# ---- the opt-in real A-bit convolution inputs ------------------------------------------------------

@pytest.mark.parametrize('conv_a_bits,expected', [('8', 8), ('a_bits', 3)])
def test_conv_a_bits_opt_in(conv_a_bits, expected):
    """The published default reads 8-bit conv inputs whatever --a_bits (3 here); 'a_bits' gives the convs after
    the stem 3-bit inputs; the stem and fc stay 8-bit either way (SPEC §3b)."""
    from quant import QuantConv2d
    from utils.run.ptq import METHODS
    model = make_tiny_resnet()
    args = argparse.Namespace(calib_search='vectorized', conv_a_bits=conv_a_bits)
    torch.manual_seed(0)
    METHODS['percentile'].function()(model, torch.randn(4, 3, 32, 32), 4, 3, args, {}, False)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    assert convs['conv1'].input_quantizer.n_bits == 8 and convs['conv1'].weight_quantizer.n_bits == 8
    assert model.fc.input_quantizer.n_bits == 8
    others = [m for n, m in convs.items() if n != 'conv1']
    assert len(others) == 11 and {m.input_quantizer.n_bits for m in others} == {expected}
    assert {m.weight_quantizer.n_bits for m in others} == {4}


# ---- the published images ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(PUBLISHED_SCRIPT), reason=f'the published QwT code is not in {PUBLISHED}')
def test_published_resnet_script_draws_what_dump_inputs_writes(tmp_path):
    """The published ResNet script (its FP and Percentile evaluations of val/ before it draws the QwT images,
    its weights from pretrained_weights/ under its working folder) captured at seed 1 against
    qwt_resnet.py --dump_inputs: the same files and pixels, which seed 0 moves. 4 classes x 130 training images
    hold the 512 QwT images (a constant of the published script); val/ has 4 images, which keeps its two
    evaluations short. Batches of 8: the published QwT pass concatenates its features batch by batch (copying
    all of them again at each batch: the copies grow with the number of batches, 26 GB at batches of 4), while
    its per-channel calibration grows with the batch. (Seed 0, the default, of the ViT script:
    tests/test_published.py.)"""
    make_image_folder(str(tmp_path / 'data'), classes=4, train_per_class=130, val_per_class=1, size=(24, 32))
    (tmp_path / 'pretrained_weights').mkdir()
    torch.save(random_resnet_state('resnet18'), tmp_path / 'pretrained_weights' / 'resnet18_imagenet.pth.tar')
    env = {**{k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')},
           'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    tool = os.path.join(ROOT, 'tools', 'capture_inputs.py')

    def flags(seed):
        return ['--model', 'resnet18', '--data_dir', 'data', '--batch_size', '8', '--num_workers', '2',
                '--seed', str(seed)]

    # seed 0 draws its first 32 QwT images only: enough to show that the seed moves them
    side_by_side([[tool, 'capture', '--cpu', '--data_dir', 'data', '--out', 'published_1.pth', '--',
                   PUBLISHED_SCRIPT, *flags(1)]] +
                 [[os.path.join(ROOT, 'qwt_resnet.py'), *flags(s), '--dump_inputs', f'ours_{s}.pth', '--device', 'cpu',
                   '--allow_class_subset', *extra] for s, extra in ((0, ('--qwt_samples', '32')), (1, ()))],
                 tmp_path, env, timeout=600)
    out, = side_by_side([[tool, 'compare', 'published_1.pth', 'ours_1.pth']], tmp_path, env)
    assert out.strip() == 'identical: 8 calibration and 512 QwT images in published_1.pth'
    published, other_seed = (torch.load(tmp_path / name) for name in ('published_1.pth', 'ours_0.pth'))
    assert published['qwt'].shape == (512, 3, 224, 224) and len(set(published['qwt_files'])) == 512
    assert len(other_seed['qwt_files']) == 32 and other_seed['qwt_files'] != published['qwt_files'][:32]


# ---- the table ------------------------------------------------------------------------------------

def test_reproduce_resnet18_row_beside_the_published_figures(folder, tmp_path):
    """tools/reproduce.py --models resnet18 --bits 4 --seeds 1 (random weights from --checkpoint_dir, a tiny
    folder, small runs): the table's ResNet-18 row shows the published FP 71.0, Percentile 58.3 and
    Percentile + QwT 68.9 beside the run's figures (the mean over several seeds: tests/test_reproduce.py)."""
    out = tmp_path / 'table'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'reproduce.py'), '--models', 'resnet18', '--bits', '4',
         '--seeds', '1', '--device', 'cpu', '--data_dir', str(folder / 'data'), '--checkpoint_dir',
         str(folder / 'ckpt'), '--output_dir', str(out), '--', '--batch_size', '4', '--qwt_samples', '8',
         '--num_workers', '0', '--eval_workers', '0', '--allow_class_subset'],
        env={**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / 'results_table.md').read_text().splitlines()
    assert lines[0].startswith('| model | bits | FP (paper) | FP (this project) | Percentile (paper) | '
                               'Percentile + QwT (paper) | Percentile (this project) |')
    r = json.load(open(out / 'resnet18_w4a4_seed1' / 'result.json'))
    assert (r['method'], r['kernel_size'], r['factor'], r['conv_a_bits'], r['seed']) == ('Percentile', 1, 64, '8', 1)
    fp = json.load(open(out / 'resnet18_fp' / 'result.json'))['fp_top1']
    row = [c.strip() for c in lines[2].strip('|').split('|')]
    assert row[:8] == ['ResNet-18', 'W4/A4', '71.0', f'{fp:.2f}', '58.3', '68.9', f"{r['ptq_top1']:.2f}",
                       f"{r['qwt_top1']:.2f}"] and row[11] == '1'


# ---- the demo: resnet_digits ------------------------------------------------------------------------

def test_resnet_digits_is_small_and_scores_as_trained():
    """models/digits/resnet_digits.pth: at most 1 MB (float16), timm's ResNet with two stages, 498 of the 500
    held-out digits right (as tools/train_digits.py measured it on the stored weights)."""
    import timm
    from models import digits, walk
    from models.resnet import block_channels
    assert os.path.getsize(digits.WEIGHTS['resnet_digits']) <= 1_000_000
    model = timm.create_model('resnet_digits', pretrained=True).eval()
    # a stride-2 block and, at the demo's factor 32, two groups per QwT convolution
    assert [block_channels(s.module) for s in walk(model)] == [(64, 64), (64, 64), (64, 128)]
    images, labels, _ = digits.split('test')
    with torch.no_grad():
        correct = int((model(digits.to_tensor(images)).argmax(1) == torch.from_numpy(labels)).sum())
    assert correct == 498
