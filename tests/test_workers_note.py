"""The published 4 training-loader workers on fewer CPUs: torch warns at every loader start (twice a run);
the run says it once, in its own words, with why the default stays."""
import warnings

import torch

from conftest import save_random_checkpoint
from utils.run import cli
from utils.run import pipeline
from utils.run.data import workers_note
from utils.run.demo import make_image_folder

NOTE = ("--num_workers 2 on 1 CPU(s): the workers share the CPUs (slower loading), but each worker's seed decides "
        "the augmentation of the images it loads, so fewer workers would draw other images than the published run "
        "(SPEC §1b); kept")


def test_the_note_only_where_workers_outnumber_cpus():
    assert workers_note(2, 1) == NOTE
    assert workers_note(4, 4) is None and workers_note(0, 1) is None


def test_a_run_says_it_once_and_torch_not_at_all(tmp_path, monkeypatch):
    root = make_image_folder(str(tmp_path / 'data'), classes=3, train_per_class=4, val_per_class=1, size=(16, 16))
    ckpt = save_random_checkpoint('vit_test_tiny', str(tmp_path / 'tiny.pth'))
    monkeypatch.setattr(torch._utils, 'cpu_count', lambda: 1)  # what torch's DataLoader counts
    monkeypatch.setattr(pipeline, 'available_cpus', lambda: 1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4',
                         '--qwt_samples', '8', '--num_workers', '2', '--eval_workers', '0', '--eval', 'none',
                         '--device', 'cpu', '--output_dir', str(tmp_path / 'out')])
    assert not [w for w in seen if 'worker processes in total' in str(w.message)]
    log = (tmp_path / 'out' / 'log.txt').read_text()
    assert log.count(NOTE) == 1
