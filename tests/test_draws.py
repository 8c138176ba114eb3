"""SPEC §1b: the same seed on the same folder draws the published run's calibration batch and QwT
images, file for file and pixel for pixel (``--dump_inputs`` against the draws written out by hand in
published_reference.py), for one process and two, and whatever is evaluated when."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, save_random_checkpoint, torch_flags
from models.registry import IMAGENET_MEAN, IMAGENET_STD
from published_reference import published_inputs
from utils.run import cli
from utils.run.data import fix_posterize
from utils.run.demo import make_image_folder


@pytest.fixture(scope='module')
def big_root(tmp_path_factory):
    """600 training images: enough for the default 32 + 512 (10 classes, the model has 1000)."""
    return make_image_folder(str(tmp_path_factory.mktemp('imagenet600')), classes=10, train_per_class=60,
                             val_per_class=1, size=(48, 64))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp('weights')
    return {name: save_random_checkpoint(timm_name, str(folder / f'{name}.pth'))
            for name, timm_name in (('deit_tiny', 'deit_tiny_patch16_224'),
                                    ('swin_tiny', 'swin_tiny_patch4_window7_224'))}


def dump(family, root, ckpt, path, *flags):
    cli.main(family, ['--data_dir', root, '--checkpoint', ckpt, '--dump_inputs', path, '--allow_class_subset',
                      '--device', 'cpu', '--output_dir', os.path.join(os.path.dirname(path), 'out'), *flags])
    return torch.load(path)


def assert_same_inputs(got, ref):
    assert got['calib_files'] == ref['calib_files']
    assert got['qwt_files'] == ref['qwt_files']
    assert got['calib'].dtype == torch.float32 and torch.equal(got['calib'], ref['calib'])
    assert torch.equal(got['qwt'], ref['qwt'])


@pytest.mark.parametrize('family,model,timm_name,seed', [
    ('vit', 'deit_tiny', 'deit_tiny_patch16_224', 0),
    ('vit', 'deit_tiny', 'deit_tiny_patch16_224', 1),
    ('swin', 'swin_tiny', 'swin_tiny_patch4_window7_224', 0),
])
def test_default_flags_draw_the_published_inputs(big_root, checkpoints, tmp_path, family, model, timm_name, seed):
    """Default batch 32, 512 QwT images, 4 workers: bit for bit the hand-written published draws."""
    got = dump(family, big_root, checkpoints[model], str(tmp_path / 'inputs.pth'), '--model', model, '--seed', str(seed))
    assert got['calib'].shape == (32, 3, 224, 224) and got['qwt'].shape == (512, 3, 224, 224)
    fix_posterize()
    ref = published_inputs(big_root, timm_name, checkpoints[model], IMAGENET_MEAN, IMAGENET_STD, seed=seed)
    assert_same_inputs(got, ref)
    other = published_inputs(big_root, timm_name, checkpoints[model], IMAGENET_MEAN, IMAGENET_STD, seed=seed + 7,
                             qwt_samples=32)  # its calibration batch alone is compared
    assert other['calib_files'] != got['calib_files']  # the comparison can tell seeds apart


@pytest.mark.parametrize('workers', [2, 0])
def test_each_step_of_the_draw_order_matters(big_root, checkpoints, tmp_path, monkeypatch, workers):
    """Leaving out the wrapping's throw-away layers (step 4) or the evaluation loader's draw (step 6)
    keeps the calibration batch but changes every QwT image: the comparison above sees both. Without
    workers the augmentations draw from this process's python, numpy and torch generators: all seeded."""
    fix_posterize()
    ref = published_inputs(big_root, 'deit_tiny_patch16_224', checkpoints['deit_tiny'], IMAGENET_MEAN, IMAGENET_STD,
                           batch_size=8, qwt_samples=16, workers=workers)
    flags = ('--model', 'deit_tiny', '--batch_size', '8', '--qwt_samples', '16', '--num_workers', str(workers))
    assert_same_inputs(dump('vit', big_root, checkpoints['deit_tiny'], str(tmp_path / 'a.pth'), *flags), ref)
    from utils.run import pipeline
    for name in ('replay_wrap_draws', 'replay_loader_iteration_draw'):
        with monkeypatch.context() as m:
            m.setattr(pipeline, name, lambda *a: None)
            got = dump('vit', big_root, checkpoints['deit_tiny'], str(tmp_path / f'{name}.pth'), *flags)
        assert torch.equal(got['calib'], ref['calib']), name
        assert got['qwt_files'] != ref['qwt_files'] and not torch.equal(got['qwt'], ref['qwt']), name


def torchrun(root, ckpt, out, *flags):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
         os.path.join(ROOT, 'qwt_vit_and_deit.py'), '--model', 'deit_tiny', '--data_dir', root, '--checkpoint', ckpt,
         '--batch_size', '8', '--qwt_samples', '32', '--num_workers', '2', '--allow_class_subset', '--device', 'cpu',
         '--output_dir', out, *flags],
        cwd=ROOT, env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_draw_the_published_shards(big_root, checkpoints, tmp_path):
    """torchrun, two gloo processes: DistributedSampler's defaults (seed 0, no set_epoch), so both passes
    see one permutation; every rank seeded alike; the calibration batch is rank 0's. A whole run then
    fits on (and reports) both ranks' images."""
    path = str(tmp_path / 'inputs.pth')
    torchrun(big_root, checkpoints['deit_tiny'], str(tmp_path / 'out'), '--dump_inputs', path)
    dumps = [torch.load(path), torch.load(path + '.rank1')]
    fix_posterize()
    refs = [published_inputs(big_root, 'deit_tiny_patch16_224', checkpoints['deit_tiny'], IMAGENET_MEAN, IMAGENET_STD,
                             batch_size=8, qwt_samples=32, workers=2, world_size=2, rank=r) for r in (0, 1)]
    assert not set(refs[1]['qwt_files']) & set(refs[0]['qwt_files'])  # two shards
    for rank, (got, ref) in enumerate(zip(dumps, refs)):
        assert got['qwt_files'] == ref['qwt_files'] and torch.equal(got['qwt'], ref['qwt']), rank
        assert got['qwt'].shape[0] == 16
        # rank 0's calibration batch on both ranks, and the same permutation in both passes
        assert got['calib_files'] == refs[0]['calib_files'] and torch.equal(got['calib'], refs[0]['calib'])
    assert dumps[0]['qwt_files'][:8] == dumps[0]['calib_files']
    first = ', '.join(f'{v:.4f}' for v in refs[0]['calib'][0, 0, 0, :5].tolist())
    assert f'calib_data[0, 0, 0, :5] = {first}' in open(tmp_path / 'out' / 'log.txt').read()

    torchrun(big_root, checkpoints['deit_tiny'], str(tmp_path / 'run'), '--eval', 'none')
    result = json.load(open(tmp_path / 'run' / 'result.json'))
    # the log's command line is the whole launch: pasted back, it starts two processes again
    command = [ln for ln in open(tmp_path / 'run' / 'log.txt') if ' ==== ' in ln][-1].split(' ==== ', 1)[1]
    assert command.startswith('torchrun --nproc_per_node 2 --master_port ') and ' --eval none' in command
    assert result['world_size'] == 2 and result['num_qwt'] == 32 and result['num_calib'] == 8
    assert result['qwt_files'] == refs[0]['qwt_files'] + refs[1]['qwt_files']
    assert result['calib_files'] == refs[0]['calib_files']


@pytest.fixture(scope='module')
def tiny_runs(tmp_path_factory):
    """Whole runs of a tiny registered ViT: eval both (twice), none, repq (before QwT), all and fp."""
    tmp = tmp_path_factory.mktemp('runs')
    root = make_image_folder(str(tmp / 'data'), classes=3, train_per_class=8, val_per_class=3)
    ckpt = save_random_checkpoint('vit_test_tiny', str(tmp / 'tiny.pth'))
    results = {}
    for name, flags in (('both', []), ('both_again', []), ('none', ['--eval', 'none']), ('repq', ['--eval', 'repq']),
                        ('all', ['--eval', 'all']), ('fp', ['--eval', 'fp'])):
        out = str(tmp / name)
        cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4',
                         '--qwt_samples', '8', '--num_workers', '2', '--device', 'cpu', '--output_dir', out, *flags])
        results[name] = json.load(open(os.path.join(out, 'result.json')))
    return results


def test_same_seed_twice_gives_the_same_result(tiny_runs):
    a, b = dict(tiny_runs['both']), dict(tiny_runs['both_again'])
    assert a.pop('timings').keys() == b.pop('timings').keys()
    assert a == b
    assert len(a['calib_files']) == 4 and len(a['qwt_files']) == 8 and a['num_qwt'] == 8
    assert all(f.startswith('train/n0000000') for f in a['calib_files'] + a['qwt_files'])


def test_what_is_evaluated_does_not_move_the_qwt_images(tiny_runs):
    both = tiny_runs['both']
    for name in ('none', 'repq'):
        r = tiny_runs[name]
        assert r['eval'] == name
        assert (r['calib_files'], r['qwt_files']) == (both['calib_files'], both['qwt_files']), name
        assert r['qwt_blocks'] == both['qwt_blocks'], name  # same pixels: the same fit
    assert tiny_runs['none']['ptq_top1'] is None and tiny_runs['none']['qwt_top1'] is None
    # evaluated before QwT, as published, the RepQ-ViT model scores what the one-pass evaluation gives it
    assert tiny_runs['repq']['ptq_top1'] == both['ptq_top1'] and tiny_runs['repq']['qwt_top1'] is None


def test_eval_all_adds_the_full_precision_model_and_moves_nothing(tiny_runs):
    """--eval all: the FP model's top-1 as --eval fp measures it, RepQ-ViT and + QwT as --eval both, from the
    same images and the same fit; and the FP size is the float model's."""
    both, fp, every = tiny_runs['both'], tiny_runs['fp'], tiny_runs['all']
    assert (every['calib_files'], every['qwt_files'], every['qwt_blocks']) == (
        both['calib_files'], both['qwt_files'], both['qwt_blocks'])
    for k in ('ptq_top1', 'ptq_top5', 'qwt_top1', 'qwt_top5', 'ptq_size_mb', 'qwt_size_mb'):
        assert every[k] == both[k], k
    assert (every['fp_top1'], every['fp_top5'], every['fp_size_mb']) == (fp['fp_top1'], fp['fp_top5'], fp['fp_size_mb'])
    assert both['fp_top1'] is None and both['fp_size_mb'] is None


def test_unreadable_val_image_is_skipped_logged_listed_and_counted(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=4, val_per_class=2)
    bad = os.path.join(root, 'val', 'n00000001', '0.JPEG')
    with open(bad, 'wb') as f:
        f.write(b'truncated')
    ckpt = save_random_checkpoint('vit_test_tiny', str(tmp_path / 'tiny.pth'))
    out = str(tmp_path / 'out')
    result = cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4',
                              '--qwt_samples', '8', '--num_workers', '0', '--eval_workers', '1', '--device', 'cpu',
                              '--output_dir', out])
    assert result['skipped_images'] == ['val/n00000001/0.JPEG']
    assert result['num_val'] == 6  # timm counts the next image in its place
    log = open(os.path.join(out, 'log.txt')).read()
    warnings = [line for line in log.splitlines() if 'skipped unreadable image' in line]
    assert len(warnings) == 1 and 'val/n00000001/0.JPEG (UnidentifiedImageError' in warnings[0]
    assert 'skipped 1 unreadable image(s), listed in result.json (skipped_images)' in log
    table_row = [line for line in log.splitlines() if line.startswith('| vit_test_tiny')]
    assert len(table_row) == 1 and '1 unreadable image(s) skipped' in table_row[0]
    assert json.load(open(os.path.join(out, 'result.json')))['skipped_images'] == ['val/n00000001/0.JPEG']


def test_seed_everything_seeds_every_generator_and_sets_cudnn():
    import random

    import numpy as np
    from utils.run.pipeline import seed_everything
    cudnn = torch.backends.cudnn
    with torch_flags((cudnn, 'benchmark', False), (cudnn, 'deterministic', False)):
        seed_everything(5)
        got = (random.random(), float(np.random.rand()), float(torch.rand(())))
        set_by_seed = cudnn.benchmark, cudnn.deterministic
    want = (random.Random(5).random(), float(np.random.RandomState(5).rand()),
            float(torch.rand((), generator=torch.Generator().manual_seed(5))))
    assert got == want
    assert set_by_seed == (True, True)
