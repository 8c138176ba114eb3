"""Both entry scripts end to end on a synthetic ImageNet-layout folder with --checkpoint (random
weights of the real architectures; nothing is downloaded)."""
import json
import os

import pytest
from PIL import Image

from conftest import run_script, save_random_checkpoint
from utils.run import cli
from utils.run.demo import make_image_folder

RESULT_KEYS = {'model', 'timm_name', 'w_bits', 'a_bits', 'seed', 'world_size', 'num_val', 'ptq_top1', 'ptq_top5',
               'qwt_top1', 'qwt_top5', 'ptq_size_mb', 'qwt_size_mb', 'timings', 'versions'}


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet')))


def check_result(out_dir, model, timm_name, proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out_dir, 'result.json')) as f:
        result = json.load(f)
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result['model'] == model and result['timm_name'] == timm_name
    assert (result['w_bits'], result['a_bits'], result['seed'], result['world_size']) == (4, 4, 0, 1)
    assert result['num_val'] == 6
    for key in ('ptq_top1', 'ptq_top5', 'qwt_top1', 'qwt_top5'):
        assert 0.0 <= result[key] <= 100.0
    assert result['ptq_top5'] >= result['ptq_top1']
    assert 0 < result['ptq_size_mb'] < result['qwt_size_mb']
    assert {'ptq', 'qwt', 'eval'} <= set(result['timings'])
    assert result['versions']['timm'] == '0.4.12'
    import torch
    numerics = result['numerics']  # what decides float results besides the code (issue 24)
    assert set(numerics) == {'device_name', 'cuda', 'cudnn', 'tf32_matmul', 'tf32_cudnn', 'float32_matmul_precision',
                             'cudnn_benchmark', 'cudnn_deterministic', 'cpu_threads'}
    assert (numerics['cudnn_benchmark'], numerics['cudnn_deterministic']) == (True, True)  # SPEC §1b step 1
    assert (numerics['tf32_matmul'], numerics['float32_matmul_precision']) == (False, 'highest')  # torch's defaults
    assert numerics['cuda'] == torch.version.cuda and numerics['device_name'] and numerics['cpu_threads'] >= 1
    log = open(os.path.join(out_dir, 'log.txt')).read()
    assert 'RepQ-ViT + QwT top-1' in log and 'QwT block 0' in log
    assert 'RepQ-ViT + QwT top-1' in proc.stdout
    return result


def test_vit_script_end_to_end(image_root, tmp_path):
    ckpt = save_random_checkpoint('deit_tiny_distilled_patch16_224', str(tmp_path / 'deit.pth'))
    out = str(tmp_path / 'out')
    proc = run_script('qwt_vit_and_deit.py', '--model', 'deit_tiny_distilled', '--data_dir', image_root, '--allow_class_subset',
                      '--w_bit', '4', '--a_bit', '4', '--checkpoint', ckpt, '--batch_size', '4',
                      '--qwt_samples', '8', '--num_workers', '0', '--output_dir', out, '--device', 'cpu',
                      '--save', str(tmp_path / 'saved.pth'))
    result = check_result(out, 'deit_tiny_distilled', 'deit_tiny_distilled_patch16_224', proc)
    assert len(result['qwt_blocks']) == 12
    check_save_load('qwt_vit_and_deit.py', result, str(tmp_path / 'saved.pth'), image_root, tmp_path)


def test_swin_script_end_to_end(image_root, tmp_path):
    ckpt = save_random_checkpoint('swin_tiny_patch4_window7_224', str(tmp_path / 'swin.pth'), wrap=True)
    out = str(tmp_path / 'out')
    proc = run_script('qwt_swin.py', '--model', 'swin_tiny', '--data_dir', image_root, '--allow_class_subset', '--w_bits', '4',
                      '--a_bits', '4', '--checkpoint', ckpt, '--batch_size', '4', '--qwt_samples', '4',
                      '--num_workers', '0', '--output_dir', out, '--save', str(tmp_path / 'saved.pth'))
    result = check_result(out, 'swin_tiny', 'swin_tiny_patch4_window7_224', proc)
    assert len(result['qwt_blocks']) == 2 + 2 + 6 + 2
    check_save_load('qwt_swin.py', result, str(tmp_path / 'saved.pth'), image_root, tmp_path)


def check_save_load(script, result, saved, image_root, tmp_path):
    """--load evaluates the --save file with no calibration: the same top-1 / top-5 on the same data,
    then a fixed --num_val subset (through the script's cli.main in this process: the script itself ran above)."""
    assert result['weights'] == 'checkpoint' and result['saved_to'] == saved and os.path.isfile(saved)
    assert [f for f in os.listdir(os.path.dirname(saved)) if f.endswith('.tmp')] == []
    out = str(tmp_path / 'loaded')
    family = {'qwt_vit_and_deit.py': 'vit', 'qwt_swin.py': 'swin'}[script]
    load = ['--load', saved, '--data_dir', image_root, '--allow_class_subset', '--batch_size', '4', '--num_workers', '0',
            '--output_dir', out]
    cli.main(family, load)
    loaded = json.load(open(os.path.join(out, 'result.json')))
    assert (loaded['weights'], loaded['source_weights'], loaded['loaded_from']) == ('loaded', 'checkpoint', saved)
    for key in ('model', 'timm_name', 'w_bits', 'a_bits', 'ptq_top1', 'ptq_top5', 'qwt_top1', 'qwt_top5',
                'ptq_size_mb', 'qwt_size_mb', 'qwt_blocks', 'num_calib', 'num_qwt', 'num_val'):
        assert loaded[key] == result[key], key
    assert 'ptq' not in loaded['timings'] and 'qwt' not in loaded['timings']
    cli.main(family, [*load, '--num_val', '4', '--eval', 'repq'])
    subset = json.load(open(os.path.join(out, 'result.json')))
    assert (subset['num_val'], subset['val_total'], subset['qwt_top1']) == (4, 6, None)
    assert subset['ptq_top1'] in (0.0, 25.0, 50.0, 75.0, 100.0)


@pytest.mark.parametrize('family,args,message', [
    ('swin', ['--model', 'deit_small'], 'run it with qwt_vit_and_deit.py'),
    ('vit', ['--model', 'resnet34'], 'not a ViT, DeiT or Swin'),
    ('vit', ['--model', 'resnet50'], '--model resnet50 is a resnet model: run it with qwt_resnet.py'),
    ('vit', ['--model', 'no_such_model'], "unknown model 'no_such_model'"),
    ('vit', ['--model', 'deit_tiny', '--w_bit', '9'], '--w_bit 9 not supported'),
    ('vit', ['--model', 'deit_tiny', '--a_bits', '1'], '--a_bits 1 not supported'),
    ('vit', ['--model', 'deit_tiny', '--checkpoint', '/nonexistent.pth'], '--checkpoint /nonexistent.pth not found'),
    ('vit', ['--model', 'deit_tiny', '--start_block', '-1'], '--start_block must be >= 0'),
])
def test_bad_flags_are_one_line_errors(image_root, capsys, family, args, message):
    from utils.run.cli import parse_args
    with pytest.raises(SystemExit) as exc:
        parse_args(family, ['--data_dir', image_root, *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(capsys):
    from utils.run.cli import parse_args
    with pytest.raises(SystemExit) as exc:
        parse_args('vit', ['--model', 'deit_tiny', '--data_dir', '/no/such/dir'])
    assert exc.value.code == 2
    assert '--data_dir /no/such/dir is not a directory (expected DATA_DIR/train/<class>/*' in capsys.readouterr().err


def test_flag_aliases_and_defaults(image_root):
    from utils.run.cli import parse_args
    a = parse_args('vit', ['--model', 'deit_small', '--data_dir', image_root, '--w_bits', '6', '--a_bit', '6',
                           '--local-rank', '3'])
    assert (a.w_bits, a.a_bits, a.local_rank) == (6, 6, 3)
    assert (a.batch_size, a.seed, a.start_block, a.qwt_samples) == (32, 0, 0, 512)
    assert (a.qwt_solver, a.qwt_accumulate, a.calib_search, a.eval) == ('inverse', 'concat', 'vectorized', 'both')
    assert a.output_dir == os.path.join('output', 'deit_small_w6a6')
    b = parse_args('swin', ['--model', 'swin_base_patch4_window7_224', '--data_dir', image_root, '--local_rank', '1'])
    assert b.local_rank == 1 and (b.w_bits, b.a_bits) == (4, 4)


def test_missing_split_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / 'train' / 'n0')
    Image.new('RGB', (32, 32)).save(tmp_path / 'train' / 'n0' / '0.JPEG')
    ckpt = save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'deit.pth'))
    proc = run_script('qwt_vit_and_deit.py', '--model', 'deit_tiny', '--data_dir', str(tmp_path), '--checkpoint', ckpt,
                      '--output_dir', str(tmp_path / 'out'), '--num_workers', '0')
    assert proc.returncode == 2
    assert 'error: val/ not found under' in proc.stderr and 'Traceback' not in proc.stderr


def test_demo_of_another_model_needs_no_data_and_no_weights(tmp_path):
    """--demo --model deit_tiny: a generated image folder and a random-weight deit_tiny (nothing cached,
    nothing fetched), the whole pipeline, then the comparison table."""
    out = str(tmp_path / 'demo')
    proc = run_script('qwt_vit_and_deit.py', '--demo', '--model', 'deit_tiny', '--output_dir', out,
                      env={'TORCH_HOME': str(tmp_path / 'torch')})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(out, 'result.json')))
    assert (result['model'], result['demo'], result['weights']) == ('deit_tiny', True, 'random')
    assert (result['num_val'], result['val_total'], result['num_calib'], result['num_qwt']) == (40, 40, 16, 32)
    assert len(result['qwt_blocks']) == 12 and result['qwt_top1'] is not None
    assert '| DeiT-T | W4/A4 | 72.2 |  | 58.2 | 61.4 |' in proc.stdout
    assert '| 1 | random weights; 10/1000 classes; demo; 16 calibration images; 32 QwT images |' in proc.stdout
    assert (result['num_classes'], result['train_classes'], result['model_classes'], result['allow_class_subset']) == \
        (10, 10, 1000, True)
    assert not os.path.exists(tmp_path / 'torch')  # nothing was downloaded
