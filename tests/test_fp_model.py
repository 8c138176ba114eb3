"""QwT after any quantizer (SPEC §6): ``qwt_compensate(q_model, images, fp_model=...)`` takes each block's
full-precision target from fp_model's matching block. On the shipped digits models (models/digits): the same
fit as the published procedure where fp_model computes what the switched-off quantizers compute; a model
quantized by brevitas directly; two gloo processes; and the one-line refusal of an fp_model that does not
correspond."""
import copy
import functools
import re

import numpy as np
import pytest
import torch

import models
import quant
from conftest import free_port, gloo_group, make_tiny_resnet, make_tiny_swin, make_tiny_vit, run_ranks
from models import digits
from quant.layers import set_quant_state
from utils.core.errors import UserError

NAMES = ('vit_digits', 'swin_digits', 'resnet_digits')
BITS = {'vit_digits': (2, 4), 'swin_digits': (3, 3), 'resnet_digits': (2, 4)}  # the --demo bits
N_QWT = 64
N_EVAL = 100

# RepQ-ViT's reparameterisation computes the float function with other rounding (the switched-off copy's logits
# are within 2.3e-6 of the float model's); QwT's fits and the fake-quantized activations at rounding boundaries
# carry that into the compensated logits. Measured over 12 runs (vit_digits W2/A4 and swin_digits W3/A3; 64 and
# 128 QwT images; 3 image offsets; float32 inverse; 200 held-out digits): max |Δ logit| <= 1.06, mean squared
# Δ <= 0.0144 (the compensated models' own logit MSE to FP: 0.25 to 0.33), top-1 flips <= 3 of 200.
FLOAT_MAX_ABS = 2.0
FLOAT_MSE = 0.05
FLOAT_MSE_SHARE = 0.2  # of the compensated model's logit MSE to FP


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _images():
    train, _, _ = digits.split('train')
    test, labels, _ = digits.split('test')
    x = digits.to_tensor(train)
    return x[:32], x[32:32 + N_QWT], digits.to_tensor(test)[:N_EVAL], torch.from_numpy(labels[:N_EVAL])


def _float(name):
    import timm
    return models.prepare_model(timm.create_model(name, pretrained=True, drop_path_rate=0.0))


@functools.lru_cache(maxsize=None)
def _quantized(name):
    """(float model, the project's quantized copy: RepQ-ViT or Percentile at the demo bits)."""
    fp = _float(name)
    ptq = quant.percentile_ptq if name.startswith('resnet') else quant.repq_vit
    return fp, ptq(copy.deepcopy(fp), _images()[0], *BITS[name])


def _comp(model):
    return [(c.comp_weight.detach().clone(), c.comp_bias.detach().clone()) for c in quant.compensated_blocks(model)]


def _logits(model):
    with torch.no_grad():
        return model(_images()[2])


@functools.lru_cache(maxsize=None)
def _today(name):
    """The published procedure (no fp_model): (W, b per block, stats, logits)."""
    q = copy.deepcopy(_quantized(name)[1])
    stats = []
    quant.qwt_compensate(q, _images()[1], stats=stats)
    return _comp(q), stats, _logits(q)


def _with_fp_model(name, fp_model):
    q = copy.deepcopy(_quantized(name)[1])
    stats = []
    quant.qwt_compensate(q, _images()[1], stats=stats, fp_model=fp_model)
    return _comp(q), stats, _logits(q)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('name', NAMES)
def test_a_switched_off_copy_gives_the_published_fit_bit_for_bit(name):
    """fp_model = a copy of q with the project's quantizers off: the same W, b, r², stats and logits, torch.equal;
    fp_model itself is not changed. The fit is not trivial (some blocks compensated, logits moved)."""
    comp, stats, logits = _today(name)
    m = copy.deepcopy(_quantized(name)[1])
    set_quant_state(m, False, False)
    before = _state(m)
    comp2, stats2, logits2 = _with_fp_model(name, m)
    assert len(comp2) == len(comp) == {'vit_digits': 4, 'swin_digits': 4, 'resnet_digits': 3}[name]
    for (w, b), (w2, b2) in zip(comp, comp2):
        assert torch.equal(w, w2) and torch.equal(b, b2)
    assert stats2 == stats and [s['r2'] for s in stats2] == [s['r2'] for s in stats]
    assert torch.equal(logits2, logits)
    assert sum(s['used'] for s in stats) >= 2 and not torch.equal(logits, _logits(_quantized(name)[1]))
    assert _same_state(_state(m), before) and not quant.compensated_blocks(m)


def test_the_float_resnet_gives_the_published_fit_bit_for_bit():
    """Percentile leaves the float function as it was: the original float model as fp_model, bit for bit."""
    comp, stats, logits = _today('resnet_digits')
    fp = _quantized('resnet_digits')[0]
    comp2, stats2, logits2 = _with_fp_model('resnet_digits', fp)
    assert all(torch.equal(w, w2) and torch.equal(b, b2) for (w, b), (w2, b2) in zip(comp, comp2, strict=True))
    assert stats2 == stats and torch.equal(logits2, logits)


@pytest.mark.parametrize('name', ['vit_digits', 'swin_digits'])
def test_the_float_transformer_agrees_within_the_stated_tolerance(name):
    """RepQ-ViT's scale reparameterisation: the switched-off quantized model is the float function with other
    rounding (logits within 1e-5 here), so the fit with the float model as fp_model agrees with the published one
    within the tolerance above (README: 'QwT after your own quantizer'); block 0, whose input is the same, has
    the same r² to 1e-4."""
    fp, q = _quantized(name)
    off = copy.deepcopy(q)
    set_quant_state(off, False, False)
    fp_logits = _logits(fp)
    assert float((_logits(off) - fp_logits).abs().max()) < 1e-5
    _, stats, logits = _today(name)
    _, stats2, logits2 = _with_fp_model(name, fp)
    delta = logits2 - logits
    own = float((logits - fp_logits).pow(2).mean())
    assert float(delta.abs().max()) <= FLOAT_MAX_ABS
    assert float(delta.pow(2).mean()) <= min(FLOAT_MSE, FLOAT_MSE_SHARE * own), (float(delta.pow(2).mean()), own)
    assert stats2[0]['r2'] == pytest.approx(stats[0]['r2'], abs=1e-4)
    assert [s['used'] for s in stats2] == [s['used'] for s in stats]



def test_a_distilled_deit_through_fp_model():
    """The distillation token enters the blocks through q_model's stem: a tiny distilled DeiT (RepQ-ViT W4/A4)
    compensated through a switched-off copy gives the published fit bit for bit, and its logits (the mean of the
    two heads) too; with the float model as fp_model, block 0 (the same input, targets that differ by rounding) gets
    the same fit to float tolerance."""
    g = torch.Generator().manual_seed(7)
    fp = make_tiny_vit(seed=2, distilled=True)
    q = quant.repq_vit(copy.deepcopy(fp), torch.randn(8, 3, 32, 32, generator=g), 4, 4)
    images = torch.randn(16, 3, 32, 32, generator=g)
    off = copy.deepcopy(q)
    set_quant_state(off, False, False)
    runs = {}
    for key, fp_model in (('published', None), ('off', off), ('float', fp)):
        m = copy.deepcopy(q)
        quant.qwt_compensate(m, images, batch_size=8, fp_model=fp_model)
        with torch.no_grad():
            runs[key] = (_comp(m), m(images))
    assert all(torch.equal(w, w2) and torch.equal(b, b2)
               for (w, b), (w2, b2) in zip(runs['published'][0], runs['off'][0], strict=True))
    assert torch.equal(runs['published'][1], runs['off'][1]) and any(w.any() for w, _ in runs['published'][0])
    (w, b), (w_ref, b_ref) = runs['float'][0][0], runs['published'][0][0]
    scale = float(w_ref.abs().max())
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-3 * scale)
    assert torch.isfinite(runs['float'][1]).all()

# --- a model quantized by brevitas directly ----------------------------------------------------------------------
def _brevitas_copy(model, w_bits, a_bits, calib):
    """``model`` with every nn.Linear of its blocks (not the head) a brevitas QuantLinear: per-channel weights at
    w_bits, per-tensor inputs at a_bits, calibrated by brevitas on ``calib``. No project code involved."""
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
    q = copy.deepcopy(model)
    for block in q.blocks:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    new = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                          weight_quant=Int8WeightPerChannelFloat, weight_bit_width=w_bits,
                                          input_quant=Int8ActPerTensorFloat, input_bit_width=a_bits)
                    new.load_state_dict(child.state_dict(), strict=False)
                    setattr(parent, child_name, new)
    q.eval()
    with torch.no_grad(), calibration_mode(q):
        q(calib)
    return q


def test_a_brevitas_model_is_compensated_through_fp_model():
    """vit_digits quantized by brevitas (W3/A3, 16 QuantLinear layers, none of the project's quantized layers):
    QwT through fp_model lowers its logit MSE to the float model by more than half (measured 1.24 -> 0.45 on
    these 64 QwT images and 100 held-out digits), and block 0's r² is that of an independent float64 least-squares
    fit of (float block - brevitas block) on the same input (up to the float32 inverse's rounding)."""
    import brevitas.nn as qnn
    from quant.layers import QUANT_LAYERS
    fp = _float('vit_digits')
    calib, qwt_images, _, _ = _images()
    q = _brevitas_copy(fp, 3, 3, calib)
    assert sum(isinstance(m, qnn.QuantLinear) for m in q.modules()) == 16
    assert not any(isinstance(m, QUANT_LAYERS) for m in q.modules())
    with torch.no_grad():
        x0 = models.stem(q, qwt_images)
        y0 = (fp.blocks[0](x0) - q.blocks[0](x0)).reshape(-1, 64).double().numpy()
    a = np.hstack([x0.reshape(-1, 64).double().numpy(), np.ones((len(y0), 1))])
    res = y0 - a @ np.linalg.lstsq(a, y0, rcond=None)[0]
    r2_ref = 1 - (res ** 2).sum() / ((y0 - y0.mean(0)) ** 2).sum()
    fp_logits, before = _logits(fp), _logits(q)
    stats = []
    quant.qwt_compensate(q, qwt_images, stats=stats, fp_model=fp)
    after = _logits(q)
    mse_before, mse_after = (float((x - fp_logits).pow(2).mean()) for x in (before, after))
    assert mse_before > 0.5 and mse_after < 0.5 * mse_before, (mse_before, mse_after)
    # the published float32 inverse fits about as well as the exact least squares, never better (measured
    # 0.7715 and 0.7739)
    assert r2_ref - 0.01 <= stats[0]['r2'] <= r2_ref + 1e-6 and stats[0]['used']
    assert len(quant.compensated_blocks(q)) == 4


# --- two gloo processes ---------------------------------------------------------------------------------------------
WORLD = 2


def _dist_fits(setup, images, keys, perturb=False):
    """(W, b) per block of each model in ``keys`` ('vit', 'resnet') after QwT with its float model as fp_model;
    ``perturb``: this process's fp_model is moved a little, as if its arithmetic differed."""
    out = {}
    for key in keys:
        fp, q = copy.deepcopy(setup[key + '_fp']), copy.deepcopy(setup[key + '_q'])
        if perturb:
            with torch.no_grad():
                for p in fp.parameters():
                    p.mul_(1.01)
        quant.qwt_compensate(q, images[key], batch_size=2, fp_model=fp, **({'factor': 32} if key == 'resnet' else {}))
        out[key] = _comp(q)
    return out


def _worker(rank, port, setup_path, out_path):
    with gloo_group(rank, WORLD, port):
        setup = torch.load(setup_path, weights_only=False)
        mine = {k: v[rank * len(v) // WORLD:(rank + 1) * len(v) // WORLD] for k, v in setup['images'].items()}
        torch.save({'plain': _dist_fits(setup, mine, ('vit', 'resnet')),
                    'perturbed': _dist_fits(setup, mine, ('vit',), perturb=rank == 1)}, out_path.format(rank=rank))


@pytest.fixture(scope='module')
def gloo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fp_model_dist')
    g = torch.Generator().manual_seed(5)
    vit_fp, resnet_fp = make_tiny_vit(seed=1), make_tiny_resnet(seed=1)
    setup = {'vit_fp': vit_fp, 'resnet_fp': resnet_fp,
             'vit_q': quant.repq_vit(copy.deepcopy(vit_fp), torch.randn(8, 3, 32, 32, generator=g), 4, 4),
             'resnet_q': quant.percentile_ptq(copy.deepcopy(resnet_fp), torch.randn(4, 3, 32, 32, generator=g), 4, 4),
             'images': {key: torch.randn(8, 3, 32, 32, generator=g) for key in ('vit', 'resnet')}}
    torch.save(setup, tmp / 'setup.pt')
    single = _dist_fits(setup, setup['images'], ('vit', 'resnet'))
    run_ranks(_worker, (free_port(), str(tmp / 'setup.pt'), str(tmp / 'rank{rank}.pt')), WORLD)
    return single, [torch.load(tmp / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


def test_two_processes_with_fp_model_end_with_rank_0s_fit(gloo_runs):
    """Both ranks end with the same W, b, also where rank 1's fp_model gives other numbers (rank 0's fit wins);
    the fit over both ranks' images is the one-process fit on all of them (to float tolerance)."""
    single, (rank0, rank1) = gloo_runs
    for run in ('plain', 'perturbed'):
        for key, comps in rank0[run].items():
            assert len(comps) == len(rank1[run][key]) > 0
            for (w0, b0), (w1, b1) in zip(comps, rank1[run][key]):
                assert torch.equal(w0, w1) and torch.equal(b0, b1), (run, key)
    for key, comps in rank0['plain'].items():
        assert any(w.any() for w, _ in comps), key
        for (w, b), (w_ref, b_ref) in zip(comps, single[key]):
            scale = float(w_ref.abs().max()) + 1.0
            torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-4 * scale)
            torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-4 * scale)
    # the ViT's 'concat' fits every token on every rank: rank 1's own (moved) targets did not decide, both ranks
    # hold rank 0's unperturbed fit
    for (w, b), (w_ref, b_ref) in zip(rank0['perturbed']['vit'], rank0['plain']['vit'], strict=True):
        assert torch.equal(w, w_ref) and torch.equal(b, b_ref)


# --- an fp_model that does not correspond ---------------------------------------------------------------------------
FIX = re.escape('pass the full-precision model that q_model was quantized from (its blocks correspond one to one)')


@functools.lru_cache(maxsize=None)
def _mismatches():
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    deeper = models.prepare_model(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                                    num_classes=10))
    wider = models.prepare_model(VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                                                   num_classes=10))
    swin = make_tiny_swin()
    other_stages = models.prepare_model(SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(1, 3),
                                                        num_heads=(2, 4), window_size=4, num_classes=10))
    merge = copy.deepcopy(swin)
    merge.layers[0].downsample.reduction = torch.nn.Linear(96, 40, bias=False)
    return {
        'count': ('vit', deeper, rf"^fp_model has 4 blocks but q_model has 3: {FIX}$"),
        'width': ('vit', wider, r"^fp_model's block 0 fails on q_model's input of shape \[2, 17, 48\] \(RuntimeError: "
                                rf".*\): {FIX}$"),
        'family': ('vit', swin, rf"^fp_model is a SwinTransformer but q_model a VisionTransformer: {FIX}$"),
        'not timm': ('vit', torch.nn.Sequential(torch.nn.Linear(2, 2)),
                     rf"^fp_model is a Sequential, not a timm VisionTransformer, SwinTransformer or ResNet: {FIX}$"),
        'stages': ('swin', other_stages, r"^fp_model's walk has PatchMerging after block 0 where q_model's has "
                                         rf"block 1 \(stages of other depths\): {FIX}$"),
        'shape': ('swin', merge, r"^fp_model's PatchMerging after block 1 gives shape \[2, 64, 40\] where "
                                 rf"q_model's gives \[2, 64, 48\] on the first batch: {FIX}$"),
        'device': ('vit', make_tiny_vit().to('meta'), r"^fp_model is on meta but q_model on cpu: move it with "
                                                       r"fp_model\.to\('cpu'\)$"),
        'resnet': ('resnet', make_tiny_resnet(bottleneck=True),
                   rf"^fp_model's block 0 gives shape \[2, 256, 8, 8\] where q_model's gives \[2, 64, 8, 8\] on the "
                   rf"first batch: {FIX}$"),
    }


@functools.lru_cache(maxsize=None)
def _tiny_quantized(kind):
    g = torch.Generator().manual_seed(0)
    if kind == 'resnet':
        return quant.percentile_ptq(make_tiny_resnet(), torch.randn(2, 3, 32, 32, generator=g), 4, 4)
    model = make_tiny_swin() if kind == 'swin' else make_tiny_vit()
    return quant.repq_vit(model, torch.randn(4, 3, 32, 32, generator=g), 4, 4)


@pytest.mark.parametrize('case', ['count', 'width', 'family', 'not timm', 'stages', 'shape', 'device', 'resnet'])
def test_a_mismatched_fp_model_is_one_line_and_changes_nothing(case):
    kind, fp_model, message = _mismatches()[case]
    q = copy.deepcopy(_tiny_quantized(kind))
    before, blocks = _state(q), [s.module for s in models.walk(q)]
    with pytest.raises(UserError, match=message) as err:
        quant.qwt_compensate(q, torch.randn(4, 3, 32, 32), batch_size=2, fp_model=fp_model)
    assert '\n' not in str(err.value)
    assert _same_state(_state(q), before) and [s.module for s in models.walk(q)] == blocks
    assert not quant.compensated_blocks(q)
