"""Arithmetic parity with the published ResNet code (../shared/published-qwt, run unchanged in a process of
its own by tests/published_resnet.py, at this process's thread count) on the same random weights and
images: every quantizer's scale and zero point, the Percentile logits, every block's W, b and r² (as fitted,
and as the compensated model keeps them), and the Percentile + QwT logits, all bit for bit. Skipped where
that folder is absent (a user's clone)."""
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

import models
import quant
import quant.quantizers as qz
from conftest import ROOT
from quant import qwt_conv
from quant.quantizers import UniformQuantizer

PUBLISHED = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'published-qwt'))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.isfile(os.path.join(PUBLISHED, 'qwt_resnet_group_conv_only_percentile.py')),
    reason=f'the published QwT code is not in {PUBLISHED} (it is not part of this repository)')]

# name: (architecture, image size, calibration / QwT / evaluation images, batch, w bits, a bits, kernel, factor,
# start_block, torch.quantile limit). The tiny ones (one block per stage) exercise 1, 2 and 4 groups (factor 64
# on 64/128/256 or 256/512/1024 input channels; factor 16: 4 to 16), stride 2 in layer2..4, kernel 3, a
# start_block above 0, and (limit 20000) the numpy fallback of the quantile for large layer-wise inputs; resnet18
# and the two-block bottleneck stage (layer2 of bottleneck_1211), blocks without a downsample after one with it.
# (The published per-channel quantile loop's time grows with the channels: a whole resnet50 costs it half a
# minute, two bottleneck blocks in every stage a third of this file's time, for nothing these do not hold.)
CASES = {
    'tiny_basic_k3': ('basic', 32, (4, 8, 3), 4, 4, 4, 3, 16, 1, 20000),
    'tiny_bottleneck_k1': ('bottleneck', 32, (4, 8, 3), 4, 3, 2, 1, 64, 0, 2 ** 24),
    'resnet18': ('resnet18', 32, (4, 8, 2), 4, 4, 4, 1, 64, 0, 2 ** 24),
    'bottleneck_1211': ('bottleneck2', 32, (2, 4, 2), 2, 6, 6, 1, 64, 0, 2 ** 24),
}


# architecture: (published block class, blocks per stage); 10 classes (the published channel loop's time
# grows with the fc's outputs)
ARCHS = {'basic': ('basic', [1, 1, 1, 1]), 'bottleneck': ('bottleneck', [1, 1, 1, 1]),
         'bottleneck2': ('bottleneck', [1, 2, 1, 1]), 'resnet18': ('basic', [2, 2, 2, 2])}
CLASSES = 10


def _model(arch, seed):
    torch.manual_seed(seed)
    if arch.startswith('resnet'):
        model = timm.create_model(arch, pretrained=False, num_classes=CLASSES)
    else:
        model = ResNet(Bottleneck if ARCHS[arch][0] == 'bottleneck' else BasicBlock, ARCHS[arch][1], num_classes=CLASSES)
    return models.randomize_batchnorms(model, seed).eval()


def _case(name, seed):
    arch, size, (n_calib, n_qwt, n_eval), batch, w_bits, a_bits, kernel, factor, start, limit = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(n, 3, size, size, generator=gen) for n in (n_calib, n_qwt, n_eval)]
    model = _model(arch, seed)
    block, layers = ARCHS[arch]
    cfg = {'state_dict': model.state_dict(), 'block': block, 'layers': layers, 'num_classes': CLASSES, 'calib': images[0], 'qwt': images[1], 'eval': images[2],
           'w_bits': w_bits, 'a_bits': a_bits, 'kernel_size': kernel, 'factor': factor, 'start_block': start,
           'batch_size': batch, 'quantile_limit': limit}
    return model, cfg


def _ours(model, cfg, monkeypatch):
    monkeypatch.setattr(qz, 'QUANTILE_TORCH_LIMIT', cfg['quantile_limit'])
    fits = []
    fit = qwt_conv.fit_group_conv

    def recording(*a, **k):
        w, b = fit(*a, **k)
        fits.append((w.clone(), b.clone()))
        return w, b
    monkeypatch.setattr(qwt_conv, 'fit_group_conv', recording)
    quant.percentile_ptq(model, cfg['calib'], cfg['w_bits'], cfg['a_bits'])
    quantizers = {n: (m.delta, m.zero_point, m.n_bits) for n, m in model.named_modules()
                  if isinstance(m, UniformQuantizer)}
    with torch.no_grad():
        percentile_logits = model(cfg['eval'])
    stats = []
    quant.qwt_compensate(model, cfg['qwt'], start_block=cfg['start_block'], batch_size=cfg['batch_size'],
                         kernel_size=cfg['kernel_size'], factor=cfg['factor'], stats=stats)
    with torch.no_grad():
        qwt_logits = model(cfg['eval'])
    final = [(m.comp_weight, m.comp_bias) for m in model.modules() if isinstance(m, quant.CompensatedConvBlock)]
    monkeypatch.undo()
    return {'quantizers': quantizers, 'percentile_logits': percentile_logits, 'fits': fits, 'stats': stats,
            'final': final, 'qwt_logits': qwt_logits}


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    """{case: (ours, published)}: the published process runs every case while this one computes its own."""
    tmp = tmp_path_factory.mktemp('published_resnet')
    cases = {name: _case(name, seed) for seed, name in enumerate(CASES)}
    torch.save([cfg for _, cfg in cases.values()], tmp / 'in.pth')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONWARNINGS='ignore')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'published_resnet.py'), PUBLISHED,
                             str(tmp / 'in.pth'), str(tmp / 'out.pth')], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mp = pytest.MonkeyPatch()
    try:
        ours = {name: _ours(model, cfg, mp) for name, (model, cfg) in cases.items()}
    finally:
        mp.undo()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    published = torch.load(tmp / 'out.pth', weights_only=False)
    assert all(p['threads'] == torch.get_num_threads() for p in published)
    return {name: (ours[name], p) for name, p in zip(CASES, published)}


@pytest.mark.parametrize('name', list(CASES))
def test_every_quantizer_equals_published(both, name):
    ours, published = both[name]
    assert sorted(ours['quantizers']) == sorted(published['quantizers'])
    for key, (delta, zp, bits) in published['quantizers'].items():
        got = ours['quantizers'][key]
        assert got[2] == bits, key
        assert got[0].shape == delta.shape and torch.equal(got[0], delta), key
        assert got[1].shape == zp.shape and torch.equal(got[1], zp), key


@pytest.mark.parametrize('name', list(CASES))
def test_percentile_logits_equal_published(both, name):
    ours, published = both[name]
    assert torch.equal(ours['percentile_logits'], published['percentile_logits'])


@pytest.mark.parametrize('name', list(CASES))
def test_every_block_fit_equals_published(both, name):
    ours, published = both[name]
    start = CASES[name][8]
    assert len(ours['fits']) == len(published['fits']) == len(ours['stats'])
    for i, ((w, b), (pw, pb, pr2), s, (fw, fb), (plw, plb)) in enumerate(
            zip(ours['fits'], published['fits'], ours['stats'], ours['final'], published['final'])):
        assert torch.equal(w, pw) and torch.equal(b, pb), i
        assert s['r2'] == float(pr2) and s['block'] == i, i
        assert s['used'] == (i >= start and float(pr2) > 0), i
        assert torch.equal(fw, plw) and torch.equal(fb, plb), i


@pytest.mark.parametrize('name', list(CASES))
def test_qwt_logits_equal_published(both, name):
    ours, published = both[name]
    assert torch.equal(ours['qwt_logits'], published['qwt_logits'])
    assert not torch.equal(ours['qwt_logits'], ours['percentile_logits'])
