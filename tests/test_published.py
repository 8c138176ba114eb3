"""The published QwT scripts themselves (../shared/published-qwt, not part of this repository) against this
project: README's "Which images" commands, verbatim, for a ViT/DeiT and a Swin. Skipped where that folder is
absent (a user's clone); CI has it.

Weights: random ones saved in a hub cache under timm's file names (the published scripts always ask timm for
pretrained weights; nothing is downloaded). Folder: 4 classes x 130 training images, so that the 512 QwT
images of the published code (a constant there) fit; --batch_size 8 keeps the published calibration short."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, save_random_checkpoint
from utils.run.demo import make_image_folder

PUBLISHED = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'published-qwt'))
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(PUBLISHED, 'qwt_vit_and_deit.py')),
    reason=f'the published QwT code is not in {PUBLISHED} (it is not part of this repository; see README, '
           '"Which images", to run this comparison yourself)')
CASES = [('qwt_vit_and_deit.py', 'deit_tiny', 'deit_tiny_patch16_224', 'deit_tiny_patch16_224-a1311bcf.pth'),
         ('qwt_swin.py', 'swin_tiny', 'swin_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224.pth')]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('published')
    make_image_folder(str(tmp / 'data'), classes=4, train_per_class=130, val_per_class=2, size=(24, 32))
    return tmp


@pytest.mark.parametrize('script,model,timm_name,weights', CASES, ids=[c[1] for c in CASES])
def test_published_script_draws_what_dump_inputs_writes(folder, script, model, timm_name, weights):
    hub = folder / 'torch' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True, exist_ok=True)
    save_random_checkpoint(timm_name, str(hub / weights))
    env = {**os.environ, 'TORCH_HOME': str(folder / 'torch'), 'PYTHONWARNINGS': 'ignore'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    same = ['--model', model, '--data_dir', 'data', '--batch_size', '8', '--num_workers', '2']

    def run(*argv):
        p = subprocess.run([sys.executable, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p

    run(os.path.join(ROOT, 'tools', 'capture_inputs.py'), 'capture', '--cpu', '--data_dir', 'data', '--out',
        f'published_{model}.pth', '--', os.path.join(PUBLISHED, script), *same)
    run(os.path.join(ROOT, script), *same, '--dump_inputs', f'ours_{model}.pth', '--device', 'cpu',
        '--allow_class_subset')
    compare = run(os.path.join(ROOT, 'tools', 'capture_inputs.py'), 'compare', f'published_{model}.pth',
                  f'ours_{model}.pth')
    assert compare.stdout.strip() == f'identical: 8 calibration and 512 QwT images in published_{model}.pth'
    got = torch.load(folder / f'published_{model}.pth')
    assert got['calib'].shape == (8, 3, 224, 224) and got['qwt'].shape == (512, 3, 224, 224)
    assert len(set(got['qwt_files'])) == 512  # one pass over 520 images: 512 distinct files
