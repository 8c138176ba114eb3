"""The published QwT scripts themselves (../shared/published-qwt, not part of this repository) against this
project: README's "Which images" commands, verbatim, for a DeiT; and the published Swin script's draws are the
ViT/DeiT script's, line for line. Skipped where that folder is absent (a user's clone); CI has it.

Weights: random ones saved in a hub cache under timm's file names (the published scripts always ask timm for
pretrained weights; nothing is downloaded). Folder: 4 classes x 130 training images, so that the 512 QwT
images of the published code (a constant there) fit; --batch_size 4 keeps the published calibration (its
per-channel loop over 4 images) short."""
import ast
import os

import pytest
import torch

from conftest import ROOT, save_random_checkpoint, side_by_side
from utils.run.demo import make_image_folder

PUBLISHED = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'published-qwt'))
pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(PUBLISHED, 'qwt_vit_and_deit.py')),
    reason=f'the published QwT code is not in {PUBLISHED} (it is not part of this repository; see README, '
           '"Which images", to run this comparison yourself)')
SCRIPT, MODEL, TIMM_NAME, WEIGHTS = ('qwt_vit_and_deit.py', 'deit_tiny', 'deit_tiny_patch16_224',
                                     'deit_tiny_patch16_224-a1311bcf.pth')


@pytest.mark.slow
def test_published_script_draws_what_dump_inputs_writes(tmp_path):
    """README's three commands for deit_tiny: the published run captured (one thread: the images do not depend
    on threads), ours, the comparison."""
    make_image_folder(str(tmp_path / 'data'), classes=4, train_per_class=130, val_per_class=2, size=(24, 32))
    hub = tmp_path / 'torch' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True)
    save_random_checkpoint(TIMM_NAME, str(hub / WEIGHTS))
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'torch'), 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(k, None)
    tool = os.path.join(ROOT, 'tools', 'capture_inputs.py')
    flags = ['--model', MODEL, '--data_dir', 'data', '--batch_size', '4', '--num_workers', '2']
    side_by_side([[tool, 'capture', '--cpu', '--data_dir', 'data', '--out', 'published.pth', '--',
                   os.path.join(PUBLISHED, SCRIPT), *flags],
                  [os.path.join(ROOT, SCRIPT), *flags, '--dump_inputs', 'ours.pth', '--device', 'cpu',
                   '--allow_class_subset']], tmp_path, env, timeout=900)
    out, = side_by_side([[tool, 'compare', 'published.pth', 'ours.pth']], tmp_path, env)
    assert out.strip() == 'identical: 4 calibration and 512 QwT images in published.pth'
    got = torch.load(tmp_path / 'published.pth')
    assert got['calib'].shape == (4, 3, 224, 224) and got['qwt'].shape == (512, 3, 224, 224)
    assert len(set(got['qwt_files'])) == 512  # one pass over 520 images: 512 distinct files


def _without_family_parts(script):
    """The published script's syntax tree without what may differ by family and draws no image: the --model
    flag's choices, main()'s model zoo, and the QwT fit after generate_compensation_model's pass over the training loader (up to
    ``output_previous = output_t``, the pass is kept)."""
    tree = ast.parse(open(os.path.join(PUBLISHED, script)).read())
    tree.body = [s for s in tree.body if not ast.unparse(s).startswith("parser.add_argument('--model',")]
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    main, fit = functions['main'], functions['generate_compensation_model']
    main.body = [s for s in main.body if not (isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == 'model_zoo')]
    kept = next(i for i, s in enumerate(fit.body) if ast.unparse(s) == 'output_previous = output_t')
    fit.body = fit.body[:kept + 1]
    return ast.dump(tree)


def _published_data_config(script, family):
    """(mean, std, crop_pct) that the published script's ``model_type`` chain sets for ``family``."""
    for node in ast.walk(ast.parse(open(os.path.join(PUBLISHED, script)).read())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == f"model_type == '{family}'":
            values = {ast.unparse(s.targets[0]): ast.literal_eval(s.value) for s in node.body}
            return values['mean'], values['std'], values['crop_pct']
    raise AssertionError(f'{script} has no model_type branch for {family!r}')


def test_the_published_swin_script_draws_as_the_vit_script():
    """What the capture above holds for the ViT/DeiT script holds for the Swin script: the two are the same
    code up to the models they take and the QwT fit that follows the draws, and the Swin's mean, std and crop are this
    project's for swin_tiny (tests/test_draws.py holds its draws with them against the written-out draws)."""
    import models
    assert _without_family_parts('qwt_swin.py') == _without_family_parts('qwt_vit_and_deit.py')
    config = models.data_config(models.resolve_model('swin_tiny'))
    assert _published_data_config('qwt_swin.py', 'swin') == (config['mean'], config['std'], config['crop_pct'])
    assert _published_data_config('qwt_swin.py', 'deit') != _published_data_config('qwt_swin.py', 'swin')
