"""Every user error is one line on stderr and exit code 2, with no traceback, and leaves no
half-written result. Most cases run the entry point in-process (fast); a few go through the
command line, as a user would."""
import json
import os
import socket

import pytest
import torch

from conftest import run_script, save_random_checkpoint
from utils.run import cli, pipeline
from quant.ptq import project as project_ptq
from utils.run.demo import make_image_folder


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet')))  # 3 classes, 12 train, 6 val


@pytest.fixture(scope='module')
def deit_ckpt(tmp_path_factory):
    return save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path_factory.mktemp('ckpt') / 'deit_tiny.pth'))


def fails(capsys, family, *args):
    """Run the entry point; assert exit code 2 and one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(family, list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err
    return err.splitlines()[-1]


def quick(image_root, deit_ckpt, tmp_path, *extra):
    """Flags of a small deit_tiny run on the synthetic folder."""
    return ['--model', 'deit_tiny', '--data_dir', image_root, '--allow_class_subset', '--checkpoint', deit_ckpt, '--batch_size', '4',
            '--qwt_samples', '8', '--num_workers', '0', '--device', 'cpu', '--output_dir', str(tmp_path / 'out'),
            *extra]


# ---- data folder -------------------------------------------------------------------------------

def test_missing_train_split(capsys, tmp_path, deit_ckpt):
    make_image_folder(str(tmp_path / 'd'))
    os.rename(tmp_path / 'd' / 'train', tmp_path / 'd' / 'elsewhere')
    line = fails(capsys, 'vit', *quick(str(tmp_path / 'd'), deit_ckpt, tmp_path))
    assert line == f"error: train/ not found under {tmp_path / 'd'} (expected {tmp_path / 'd'}/train/<class>/*)"


def test_split_without_class_folders(capsys, tmp_path, deit_ckpt):
    make_image_folder(str(tmp_path / 'd'))
    for f in os.listdir(tmp_path / 'd' / 'val'):
        os.rename(tmp_path / 'd' / 'val' / f, tmp_path / f)
    line = fails(capsys, 'vit', *quick(str(tmp_path / 'd'), deit_ckpt, tmp_path))
    assert line == f"error: no class folders in {tmp_path / 'd' / 'val'} (expected {tmp_path / 'd' / 'val'}/<class>/*.JPEG)"


def test_class_folder_without_images(capsys, tmp_path, deit_ckpt):
    make_image_folder(str(tmp_path / 'd'))
    os.makedirs(tmp_path / 'd' / 'train' / 'n99999999')
    (tmp_path / 'd' / 'train' / 'n99999999' / 'notes.txt').write_text('not an image')
    line = fails(capsys, 'vit', *quick(str(tmp_path / 'd'), deit_ckpt, tmp_path))
    assert line.startswith(f"error: no images in class folder(s) n99999999 of {tmp_path / 'd' / 'train'}")
    assert '.jpeg' in line


def test_fewer_training_images_than_calibration_plus_qwt(capsys, image_root, deit_ckpt, tmp_path):
    line = fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path), '--qwt_samples', '12')
    assert line == (f"error: {image_root}/train has 12 images, fewer than the calibration batch (--batch_size 4) "
                    "plus --qwt_samples 12 = 16: add images or lower those flags")
    assert not os.path.exists(tmp_path / 'out' / 'result.json')


@pytest.mark.parametrize('workers', [0, 1])
def test_undecodable_image_is_named_with_strict_images(capsys, tmp_path, deit_ckpt, workers):
    """--strict_images: the first unreadable file stops the run, named, also from a worker process."""
    root = make_image_folder(str(tmp_path / 'd'))
    for c in os.listdir(os.path.join(root, 'train')):
        for f in os.listdir(os.path.join(root, 'train', c)):
            with open(os.path.join(root, 'train', c, f), 'wb') as fh:
                fh.write(b'not a jpeg')
    line = fails(capsys, 'vit', *quick(root, deit_ckpt, tmp_path), '--num_workers', str(workers), '--strict_images')
    assert line.startswith(f"error: cannot decode image {root}/train/n0000000")
    assert '.JPEG (UnidentifiedImageError' in line
    assert line.endswith('replace or remove the file, or leave out --strict_images to skip it as timm does')
    # without the flag, timm's skip-and-retry gives up after 50 in a row
    line = fails(capsys, 'vit', *quick(root, deit_ckpt, tmp_path), '--num_workers', str(workers))
    assert line.startswith(f"error: 50 unreadable images in a row in {root}/train, the last train/n0000000")
    assert '.JPEG (UnidentifiedImageError: cannot identify image file' in line and line.endswith('): check the folder')


# ---- flags -------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,args,message', [
    ('vit', ['--model', 'deit_tiny', '--qwt_samples', '10', '--batch_size', '4'],
     '--qwt_samples 10 is not a multiple of --batch_size 4 x 1 process(es) = 4: use 8 or 12'),
    ('vit', ['--model', 'deit_tiny', '--w_bit', '1'], '--w_bit 1 not supported: use 2 to 8'),
    ('vit', ['--model', 'deit_tiny', '--a_bits', '9'], '--a_bits 9 not supported: use 2 to 8'),
    ('vit', ['--model', 'deit_tiny', '--num_val', '0'], '--num_val must be positive, got 0'),
    ('vit', ['--model', 'deit_smal'], "unknown model 'deit_smal': use one of vit_small, vit_base, deit_tiny,"),
    ('swin', ['--model', 'deit_small'], '--model deit_small is a vit model: run it with qwt_vit_and_deit.py'),
    ('vit', ['--model', 'swin_tiny'], '--model swin_tiny is a swin model: run it with qwt_swin.py'),
    ('vit', ['--data_dir', '.'], '--model is required (vit_small, vit_base, deit_tiny'),
    ('vit', ['--model', 'deit_tiny', '--load', 'x.pth', '--checkpoint', 'y.pth'], '--checkpoint and --load exclude'),
    ('vit', ['--model', 'deit_tiny', '--load', '/no/saved.pth'], '--load /no/saved.pth not found'),
    ('vit', ['--model', 'deit_tiny', '--seed', '-1'], "--seed -1 is outside 0..2^32-1 (numpy's range)"),
    ('vit', ['--model', 'deit_tiny', '--save', '/etc/hostname/q/m.pth'], '--save /etc/hostname/q/m.pth: /etc/hostname is not a writable folder'),
    ('vit', ['--model', 'deit_tiny', '--save', '/tmp'], '--save /tmp: is a directory; choose another path'),
    ('vit', ['--model', 'deit_tiny', '--output_dir', '/etc/hostname'], '--output_dir /etc/hostname is a file, not a folder'),
    ('vit', ['--model', 'deit_tiny', '--eval', 'fp', '--save', 'm.pth'], '--eval fp evaluates the full-precision model only: leave out --save'),
    ('vit', ['--model', 'deit_tiny', '--load', 'x.pth', '--eval', 'fp'], '--eval fp and --load exclude each other'),
    ('vit', ['--model', 'deit_tiny', '--load', 'x.pth', '--eval', 'all'], '--eval all and --load exclude each other: '
                                                                          '--load holds a quantized model, not the '
                                                                          'full-precision one'),
    ('vit', ['--model', 'deit_tiny', '--num_workers', '-1'], '--num_workers must be >= 0, got -1'),
])
def test_bad_flag_values(capsys, image_root, family, args, message):
    argv = args if '--data_dir' in args else ['--data_dir', image_root, *args]
    assert message in fails(capsys, family, *argv)


def test_seed_up_to_2_to_the_32_minus_1(capsys, image_root):
    """numpy's seed range: --seed 4294967295 (2^32 - 1) is accepted, 4294967296 refused."""
    from utils.run.cli import parse_args
    argv = ['--model', 'deit_tiny', '--data_dir', image_root, '--seed']
    assert parse_args('vit', argv + ['4294967295']).seed == 4294967295
    line = fails(capsys, 'vit', *argv, '4294967296')
    assert line.endswith("error: --seed 4294967296 is outside 0..2^32-1 (numpy's range)")


def test_launcher_variable_not_an_integer(capsys, image_root, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', 'two')
    line = fails(capsys, 'vit', '--model', 'deit_tiny', '--data_dir', image_root)
    assert line.endswith("error: environment variable WORLD_SIZE='two' is not an integer: unset it, or start "
                         "the run with torchrun, which sets it")


def test_qwt_samples_must_divide_over_processes(capsys, image_root, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    line = fails(capsys, 'vit', '--model', 'deit_tiny', '--data_dir', image_root, '--batch_size', '32')
    assert '--qwt_samples 512 is not a multiple of --batch_size 32 x 3 process(es) = 96: use 480 or 576' in line


# ---- weights -----------------------------------------------------------------------------------

def test_unreadable_checkpoint(capsys, image_root, tmp_path):
    bad = tmp_path / 'garbage.pth'
    bad.write_bytes(b'\x00garbage' * 10)
    line = fails(capsys, 'vit', *quick(image_root, str(bad), tmp_path))
    assert line.startswith(f'error: cannot read checkpoint {bad} (')
    assert line.endswith('expected a .pth state dict saved with torch.save')


def test_checkpoint_of_another_model_names_mismatches(capsys, image_root, tmp_path):
    """A distilled DeiT checkpoint for the plain model: an unexpected key; a Swin one: missing keys."""
    ckpt = save_random_checkpoint('deit_tiny_distilled_patch16_224', str(tmp_path / 'dist.pth'))
    line = fails(capsys, 'vit', *quick(image_root, ckpt, tmp_path))
    assert line.startswith(f'error: checkpoint {ckpt} does not fit deit_tiny_patch16_224: ')
    assert 'unexpected keys dist_token, head_dist.weight, head_dist.bias' in line
    assert 'shapes (checkpoint vs model) pos_embed (1, 198, 192) vs (1, 197, 192)' in line


def test_checkpoint_missing_keys(capsys, image_root, tmp_path):
    state = torch.load(save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'a.pth')))
    del state['head.weight'], state['blocks.0.norm1.bias']
    torch.save(state, tmp_path / 'cut.pth')
    line = fails(capsys, 'vit', *quick(image_root, str(tmp_path / 'cut.pth'), tmp_path))
    assert 'missing keys blocks.0.norm1.bias, head.weight' in line


def test_checkpoint_with_plain_extras_loads(tmp_path):
    """A state dict saved next to numbers and strings needs no trust: the tensors-only loader reads it."""
    from models import build_model
    state = torch.load(save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'a.pth')))
    torch.save({'model': state, 'epoch': 3, 'arch': 'deit_tiny'}, tmp_path / 'full.pth')
    model = build_model('deit_tiny', checkpoint=str(tmp_path / 'full.pth'))
    assert torch.equal(model.head.weight, state['head.weight'])


def test_checkpoint_with_python_objects_needs_trust(capsys, image_root, tmp_path, monkeypatch):
    """A state dict saved next to an argparse Namespace: refused in one line naming both fixes, never
    unpickled unless --trust_checkpoint, with which it loads."""
    import argparse
    from models import build_model
    state = torch.load(save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'a.pth')))
    full = str(tmp_path / 'full.pth')
    torch.save({'model': state, 'args': argparse.Namespace(lr=5e-4), 'epoch': 299}, full)
    unsafe = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: unsafe.append(k.get('weights_only')) or real_load(*a, **k))
    line = fails(capsys, 'vit', *quick(image_root, full, tmp_path))
    assert line == (f"error: checkpoint {full} holds Python objects other than tensors (argparse.Namespace), which "
                    "are not unpickled unless trusted: re-save its state dict, e.g. python -c \"import torch; "
                    f"torch.save(torch.load('{full}', weights_only=False)['model'], 'weights.pth')\", or pass "
                    "--trust_checkpoint if you trust the file")
    assert unsafe == [True]
    model = build_model('deit_tiny', checkpoint=full, trust_checkpoint=True)
    assert torch.equal(model.head.weight, state['head.weight'])
    assert unsafe == [True, False]
    from utils.run.cli import parse_args
    args = parse_args('vit', quick(image_root, full, tmp_path, '--trust_checkpoint'))
    assert args.trust_checkpoint is True
    assert parse_args('vit', quick(image_root, full, tmp_path)).trust_checkpoint is False
    stop = RuntimeError('stop after loading the weights')
    monkeypatch.setattr(project_ptq, 'repq_vit', lambda *a, **k: (_ for _ in ()).throw(stop))
    with pytest.raises(RuntimeError, match='stop after loading the weights'):
        cli.main('vit', quick(image_root, full, tmp_path, '--trust_checkpoint'))
    assert unsafe[-1] is False


def test_offline_download_names_file_url_and_cache(image_root, tmp_path):
    """No --checkpoint and no network (a proxy that refuses connections): the message says where to put
    the weights file so that the next run works offline."""
    proc = run_script('qwt_vit_and_deit.py', '--model', 'deit_tiny', '--data_dir', image_root, '--allow_class_subset',
                      '--batch_size', '4',
                      '--qwt_samples', '8', '--num_workers', '0', '--output_dir', str(tmp_path / 'out'),
                      env={'TORCH_HOME': str(tmp_path / 'torch'), 'https_proxy': 'http://127.0.0.1:9',
                           'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': '', 'NO_PROXY': ''})
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith('error: could not get the pretrained weights of deit_tiny_patch16_224 (')
    assert 'download https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth' in line
    assert f"place deit_tiny_patch16_224-a1311bcf.pth in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in line
    assert line.endswith('or pass --checkpoint PATH/deit_tiny_patch16_224-a1311bcf.pth')


def test_corrupt_cached_weights_say_delete(tmp_path, monkeypatch):
    from models import build_model
    from utils.core.errors import UserError
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cached = tmp_path / 'hub' / 'checkpoints' / 'deit_tiny_patch16_224-a1311bcf.pth'
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'half a download')
    with pytest.raises(UserError, match=f'cannot read the cached weights {cached} .*delete the file and run again'):
        build_model('deit_tiny')


def test_messages_are_one_line():
    from utils.core.errors import ImageDecodeError, cause, one_line
    wrapped = ImageDecodeError('Caught ImageDecodeError in DataLoader worker process 0.\nOriginal Traceback '
                               '(most recent call last):\n  File "x.py", line 1\nutils.errors.ImageDecodeError: '
                               'cannot decode image a.JPEG (OSError: truncated): replace or remove the file')
    assert one_line(wrapped) == 'cannot decode image a.JPEG (OSError: truncated): replace or remove the file'
    assert one_line(ValueError('two\n  lines')) == 'two lines'
    assert cause(OSError('first\nsecond')) == 'OSError: first' and cause(KeyError()) == 'KeyError'
    assert cause(ValueError('x' * 500)) == 'ValueError: ' + 'x' * 200


# ---- device and processes ----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a GPU')
def test_cuda_without_gpu(capsys, image_root, deit_ckpt, tmp_path):
    line = fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path), '--device', 'cuda')
    assert line == 'error: --device cuda asked for, but no CUDA device is visible: use --device cpu'


def test_unknown_device(capsys, image_root, deit_ckpt, tmp_path):
    line = fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path), '--device', 'gpu0')
    assert line == 'error: --device gpu0 is not a device: use cuda, cuda:N or cpu'


def test_process_group_without_rendezvous_address(capsys, image_root, deit_ckpt, tmp_path, monkeypatch):
    for k, v in {'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0'}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    monkeypatch.delenv('MASTER_PORT', raising=False)
    line = fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path, '--qwt_samples', '8'))
    assert line.startswith('error: could not form the gloo process group (RANK=0, WORLD_SIZE=2, MASTER_ADDR=(unset)')
    assert 'MASTER_ADDR' in line and line.endswith('and pick a free --master_port')


def test_process_group_port_taken(image_root, deit_ckpt, tmp_path):
    """Rank 0 cannot listen on MASTER_PORT because something else holds it (command line)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_script('qwt_vit_and_deit.py', *quick(image_root, deit_ckpt, tmp_path),
                          env={'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1',
                               'MASTER_PORT': str(port)})
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f'error: could not form the gloo process group (RANK=0, WORLD_SIZE=2, '
                           f'MASTER_ADDR=127.0.0.1, MASTER_PORT={port}): ')


@pytest.mark.parametrize('target,exc,expected', [
    ('repq_vit', RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"),
     'error: out of memory (RAM) in stage ptq: the post-training quantizer (--ptq) calibrates on one batch of '
     '--batch_size images (32 as published; a smaller batch changes the calibration): use a device with more memory '
     '(DefaultCPUAllocator: '),
    ('repq_vit', MemoryError(), 'error: out of memory (RAM) in stage ptq: '),
    ('qwt_compensate', torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has'),
     "error: out of GPU memory in stage qwt: QwT holds every block's features of all --qwt_samples images: "
     '--qwt_accumulate normal needs a fraction of that memory (the same fit to float tolerance), fewer --qwt_samples '
     'less (not the published 512), and more GPUs (torchrun --nproc_per_node N) split the images (CUDA out of memory. '
     'Tried to allocate 2.00 GiB. GPU 0 has)'),
    ('qwt_compensate', RuntimeError('cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`'),
     'error: out of GPU memory in stage qwt: '),
    ('evaluate', RuntimeError('CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`'),
     'error: out of GPU memory in stage eval: evaluation: rerun with --save PATH (written before evaluation), then '
     'evaluate with --load PATH and a smaller --batch_size')])
def test_out_of_memory_names_what_helps_in_the_stage_that_ran_out(capsys, image_root, deit_ckpt, tmp_path, monkeypatch,
                                                                   target, exc, expected):
    """Hazard: 'lower --batch_size' changes the published calibration batch and does nothing for QwT. The
    line names the stage and its remedy; cuBLAS/cuSOLVER allocation failures count as running out."""
    def oom(*args, **kwargs):
        raise exc
    monkeypatch.setattr(project_ptq if target == 'repq_vit' else pipeline, target, oom)
    line = fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path))
    assert line.startswith(expected)
    assert line.count('\n') == 0 and ('--batch_size' not in line or target != 'qwt_compensate')


@pytest.mark.parametrize('exc', [RuntimeError('shape mismatch inside the library'),
                                 ValueError('bad reshape inside the library'), OSError('fd closed inside the library')])
def test_a_bug_keeps_its_traceback(image_root, deit_ckpt, tmp_path, monkeypatch, exc):
    """Only the project's own user errors (and running out of memory) are shortened: a RuntimeError,
    ValueError or OSError raised inside the library is a bug and propagates with its traceback."""
    def bug(*args, **kwargs):
        raise exc
    monkeypatch.setattr(project_ptq, 'repq_vit', bug)
    with pytest.raises(type(exc), match=str(exc)):
        cli.main('vit', quick(image_root, deit_ckpt, tmp_path))


# ---- nothing half-written ----------------------------------------------------------------------

def test_failed_run_keeps_earlier_result_and_log(capsys, image_root, deit_ckpt, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'result.json').write_text('{"finished": true}\n')
    (out / 'log.txt').write_text('earlier run\n')
    fails(capsys, 'vit', *quick(image_root, deit_ckpt, tmp_path), '--num_val', '7')  # val has 6 images
    assert json.loads((out / 'result.json').read_text()) == {'finished': True}
    log = (out / 'log.txt').read_text()
    assert log.startswith('earlier run\n') and '====' in log
    assert log.rstrip().endswith('error: --num_val 7 is outside 1..6, the size of the val split')
    assert sorted(os.listdir(out)) == ['log.txt', 'result.json']
