"""The digits models of models/digits (trained on real images, the UCI handwritten digits) through the
library API: the committed files are the ones the README names, the registered timm models load them
and score what they scored when trained, and at the demo bits QwT recovers accuracy that RepQ-ViT
loses, for the ViT and the Swin; at W6/A6 it costs no more than noise. Nothing is downloaded.

Each run follows tools/measure_digits.py: the image folder of ``write_image_folder``; per seed, the
first batch of the shuffled training loader (the training-split transform) calibrates RepQ-ViT (32
images), a new pass gives the 256 QwT images; QwT with the published defaults (float32 inverse,
'concat'); evaluation of the 500 held-out digits."""
import functools
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from models import digits
from tools import measure_digits

NAMES = ('vit_digits', 'swin_digits')
SEEDS = (0, 1, 2)

# Measured on the committed weights (tools/measure_digits.py; torch 2.14.1 CPU, timm 0.4.12, Pillow 13.0):
# correct of the 500 held-out digits at full precision.
FP_CORRECT = {'vit_digits': 480, 'swin_digits': 472}

# The demo bits (W, A) of each model: where quantization visibly hurts and QwT gives back at least
# MIN_GAIN points of top-1 and MIN_MSE_REDUCTION of the mean squared logit error to FP, in the mean of
# seeds 0, 1, 2 (published defaults: float32 inverse, 'concat'), with the demo's pinned CPU kernels
# (utils.core.cpu_numerics; tools/measure_digits.py pins them), so on any x86-64 CPU. Measured (RepQ-ViT ->
# RepQ-ViT + QwT; test_the_readmes_state_the_figures_of_these_runs holds every figure):
#   swin_digits W3/A3: top-1 90.00 -> 92.40 (+2.40; seeds 90.0/89.8/90.2 -> 92.8/92.8/91.6),
#                      logit MSE 0.536 -> 0.311 (42 % lower); FP 94.4
#   vit_digits  W2/A4: top-1 90.07 -> 92.33 (+2.27; seeds 90.6/89.2/90.4 -> 92.8/92.2/92.0),
#                      logit MSE 0.510 -> 0.287 (44 % lower); FP 96.0
# The ViT does NOT meet the target at W3/A3 (models/digits/README.md): QwT's fit on training-split (augmented)
# images carries over to the clean held-out digits less than for the Swin.
DEMO_BITS = {'vit_digits': (2, 4), 'swin_digits': (3, 3)}
MIN_GAIN = 1.0            # points (margins at the measured values: 1.27 and 1.40 points)
MIN_MSE_REDUCTION = 0.20  # (margins: 24 and 22 percentage points)

# At W6/A6, QwT - RepQ-ViT per seed 0, 1, 2 (points), measured: swin_digits -0.2, +0.2, -0.4;
# vit_digits -0.6, -1.0, 0.0. Bound: 6 of the 500 images.
W6_BOUND = 1.2


def _readme_hashes():
    text = open(os.path.join(digits.HERE, 'README.md')).read()
    return dict(re.findall(r'`([\w.]+)`\s*\|\s*\d+\s*\|\s*`([0-9a-f]{64})`', text))


def test_the_demo_runs_at_the_bits_measured_here():
    from utils.run.demo import DIGITS_DEMO
    assert {d['model']: (d['w_bits'], d['a_bits']) for d in DIGITS_DEMO.values()} == {**DEMO_BITS,
                                                                                     'resnet_digits': (2, 8)}


def test_committed_files_match_readme_sha256():
    hashes = _readme_hashes()
    assert set(hashes) == {'digits.npz', 'vit_digits.pth', 'swin_digits.pth', 'resnet_digits.pth'}
    for name, expected in hashes.items():
        with open(os.path.join(digits.HERE, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected, name


def test_arrays():
    data = digits.load_arrays()
    assert data['images'].shape == (1797, 8, 8) and data['images'].dtype == np.uint8
    assert data['images'].max() == 16 and data['labels'].max() == 9
    assert int(data['test'].sum()) == 500
    assert np.bincount(data['labels'][data['test']]).tolist() == [50] * 10  # 50 held out per class


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return digits.write_image_folder(str(tmp_path_factory.mktemp('digits')))


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread for these small models: RepQ-ViT's quantizer search and QwT on them run ~15x slower
    with two threads on a busy 2-core machine (1.9 s vs 30 s for one run). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _data(folder, name):
    train, val = measure_digits.datasets(folder, name)
    return train, measure_digits.stack_val(val)


def test_image_folder_is_the_arrays(folder):
    train, (x_val, y_val) = _data(folder, 'vit_digits')
    images, labels, index = digits.split('test')
    order = np.lexsort((index, labels))  # the folder lists val/<class>/<index>.png class by class
    assert len(train) == 1297 and train.classes == list(digits.CLASSES)
    assert torch.equal(y_val, torch.from_numpy(labels[order]))
    # the evaluation transform of the PNG files gives the pixels the models were trained on
    assert torch.allclose(x_val, digits.to_tensor(images[order]), atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_registered_model_loads_committed_weights(folder, name):
    import timm
    import models
    model = models.prepare_model(timm.create_model(name, pretrained=True, drop_path_rate=0.0))
    state = torch.load(digits.WEIGHTS[name], map_location='cpu', weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    spec = models.resolve_model(name)
    assert models.data_config(spec) == {'img_size': 32, 'mean': digits.MEAN, 'std': digits.STD, 'crop_pct': 1.0,
                                        'interpolation': 'bicubic'}
    _, (x_val, y_val) = _data(folder, name)
    logits = measure_digits.logits_of(model, x_val)
    assert int((logits.argmax(1) == y_val).sum()) == FP_CORRECT[name]


@pytest.fixture(scope='module')
def pinned_runs(tmp_path_factory):
    """tools/measure_digits.py as a script (so that it pins the CPU kernels before torch loads, as the demo
    does: the figures then hold on any x86-64 CPU), per model at its demo bits and W6/A6, seeds 0, 1, 2, the
    published solver: {(name, w_bits, a_bits): [run per seed]}."""
    tmp = tmp_path_factory.mktemp('measured')
    runs = {}
    for name in NAMES:
        out = tmp / f'{name}.json'
        w, a = DEMO_BITS[name]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'measure_digits.py'), '--models', name,
                               '--bits', f'{w}/{a}', '6', '--seeds', *map(str, SEEDS), '--solvers', 'inverse',
                               '--json', str(out)], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert 'Warning:' not in proc.stderr, proc.stderr[-2000:]  # timm's known ones filtered, as in the scripts
        for r in json.load(open(out)):
            runs.setdefault((name, r['w_bits'], r['a_bits']), []).append(r)
    return runs


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.slow
def test_qwt_recovers_accuracy_at_demo_bits(pinned_runs, name):
    runs = pinned_runs[(name, *DEMO_BITS[name])]
    assert [r['seed'] for r in runs] == list(SEEDS)
    repq = np.mean([r['repq'] for r in runs])
    qwt = np.mean([r['qwt']['inverse']['top1'] for r in runs])
    mse_repq = np.mean([r['mse_repq'] for r in runs])
    mse_qwt = np.mean([r['qwt']['inverse']['mse'] for r in runs])
    assert runs[0]['fp'] - repq >= 2.0, 'quantization must visibly hurt at the demo bits'
    assert qwt - repq >= MIN_GAIN, (repq, qwt)
    assert 1 - mse_qwt / mse_repq >= MIN_MSE_REDUCTION, (mse_repq, mse_qwt)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.slow
def test_qwt_costs_no_more_than_noise_at_w6a6(pinned_runs, name):
    for r in pinned_runs[(name, 6, 6)]:
        assert abs(r['qwt']['inverse']['top1'] - r['repq']) <= W6_BOUND, r


@pytest.mark.slow
def test_the_readmes_state_the_figures_of_these_runs(pinned_runs):
    """The README's sentence on seeds 0, 1, 2 and models/digits/README.md's rows at the demo bits and W6/A6
    are those of the pinned runs (tools/measure_digits.py prints them)."""
    readme = ' '.join(open(os.path.join(ROOT, 'README.md')).read().split())
    sentence = measure_digits.seeds_sentence(pinned_runs[('vit_digits', *DEMO_BITS['vit_digits'])],
                                             pinned_runs[('swin_digits', *DEMO_BITS['swin_digits'])],
                                             [r for name in NAMES for r in pinned_runs[(name, 6, 6)]])
    assert sentence in readme
    table = open(os.path.join(digits.HERE, 'README.md')).read().splitlines()
    for (name, w, a), runs in pinned_runs.items():
        assert measure_digits.table_row(runs, bold=(w, a) == DEMO_BITS[name]) in table, (name, w, a)
