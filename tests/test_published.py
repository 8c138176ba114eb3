"""The published QwT scripts themselves (../shared/published-qwt, not part of this repository) against this
project: README's "Which images" commands, verbatim, for a ViT/DeiT and a Swin. Skipped where that folder is
absent (a user's clone); CI has it.

Weights: random ones saved in a hub cache under timm's file names (the published scripts always ask timm for
pretrained weights; nothing is downloaded). Folder: 4 classes x 130 training images, so that the 512 QwT
images of the published code (a constant there) fit; --batch_size 8 keeps the published calibration short."""
import os

import pytest
import torch

from conftest import ROOT, side_by_side, save_random_checkpoint
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


def test_published_scripts_draw_what_dump_inputs_writes(folder):
    """README's three commands for deit_tiny and swin_tiny; the two published runs side by side (one thread
    each: the images do not depend on threads), then ours."""
    hub = folder / 'torch' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True, exist_ok=True)
    for _, _, timm_name, weights in CASES:
        save_random_checkpoint(timm_name, str(hub / weights))
    env = {**os.environ, 'TORCH_HOME': str(folder / 'torch'), 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    tool = os.path.join(ROOT, 'tools', 'capture_inputs.py')

    def at_once(commands):  # both runs at once
        return side_by_side(commands, folder, env, timeout=900)

    def flags(model):
        return ['--model', model, '--data_dir', 'data', '--batch_size', '8', '--num_workers', '2']

    at_once([[tool, 'capture', '--cpu', '--data_dir', 'data', '--out', f'published_{model}.pth', '--',
              os.path.join(PUBLISHED, script), *flags(model)] for script, model, _, _ in CASES])
    at_once([[os.path.join(ROOT, script), *flags(model), '--dump_inputs', f'ours_{model}.pth', '--device',
              'cpu', '--allow_class_subset'] for script, model, _, _ in CASES])
    compared = at_once([[tool, 'compare', f'published_{model}.pth', f'ours_{model}.pth']
                        for _, model, _, _ in CASES])
    for (_, model, _, _), out in zip(CASES, compared):
        assert out.strip() == f'identical: 8 calibration and 512 QwT images in published_{model}.pth'
        got = torch.load(folder / f'published_{model}.pth')
        assert got['calib'].shape == (8, 3, 224, 224) and got['qwt'].shape == (512, 3, 224, 224)
        assert len(set(got['qwt_files'])) == 512  # one pass over 520 images: 512 distinct files
