"""RepQ-ViT scale reparameterisation (SPEC §2 step 2) and the whole repq_vit procedure."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import reference

from quant.layers import QuantConv2d, QuantLinear, QuantMatMul, quantizers, set_quant_state
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer, search_uniform_channelwise
from quant.reparam import norm_linear_pairs, reparam_factors, reparameterize, reparameterize_pair
from quant.repq import repq_vit
from quant.wrap import quantize_model

W_BITS, A_BITS = 4, 4


def test_reparam_factors_hand_values():
    # delta = [0.1, 0.2, 0.3], zp = [1, 2, 4]
    #   min_c  = -zp*delta        = [-0.1, -0.4, -1.2]
    #   delta* = mean(delta)      = 0.2
    #   zp*    = mean(zp)         = 7/3 (not rounded)
    #   min*   = -zp* * delta*    = -0.466667
    #   r      = delta / delta*   = [0.5, 1.0, 1.5]
    #   b      = min_c / r - min* = [-0.2, -0.4, -0.8] + 0.466667 = [0.266667, 0.066667, -0.333333]
    delta = torch.tensor([0.1, 0.2, 0.3])
    zp = torch.tensor([1.0, 2.0, 4.0])
    r, b, d_star, z_star = reparam_factors(delta, zp)
    assert r.tolist() == pytest.approx([0.5, 1.0, 1.5], rel=1e-6)
    assert b.tolist() == pytest.approx([0.2666667, 0.0666667, -0.3333333], abs=1e-6)
    assert d_star.dim() == 0 and d_star.item() == pytest.approx(0.2, rel=1e-6)
    assert z_star.dim() == 0 and z_star.item() == pytest.approx(7 / 3, rel=1e-6)


def _pair(bias=True):
    g = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.2, 0.8, -0.5]))
        norm.bias.copy_(torch.tensor([0.1, -0.3, 0.4]))
    lin = nn.Linear(3, 2, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 3, generator=g))
        if bias:
            lin.bias.copy_(torch.tensor([0.5, -0.5]))
    q = QuantLinear(lin, UniformQuantizer(4, channel_wise=True), UniformQuantizer(4, channel_wise=True))
    iq = q.input_quantizer
    iq.delta = torch.tensor([0.1, 0.2, 0.3]).reshape(1, 1, 3)
    iq.zero_point = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 1, 3)
    iq.inited = True
    q.weight_quantizer.inited = True
    return norm, q


@pytest.mark.parametrize('bias', [True, False])
def test_reparameterize_pair_hand_values(bias):
    norm, lin = _pair(bias)
    gamma, beta = norm.weight.detach().clone(), norm.bias.detach().clone()
    w = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone() if bias else torch.zeros(2)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        ref = lin(norm(x))
    reparameterize_pair(norm, lin)
    r = torch.tensor([0.5, 1.0, 1.5])
    b = torch.tensor([0.2666667, 0.0666667, -0.3333333])
    torch.testing.assert_close(norm.weight.detach(), gamma / r)
    torch.testing.assert_close(norm.bias.detach(), beta / r - b)
    torch.testing.assert_close(lin.weight.detach(), w * r)
    assert isinstance(lin.bias, nn.Parameter) and 'bias' in dict(lin.named_parameters())
    torch.testing.assert_close(lin.bias.detach(), b0 + (w * r) @ b)
    with torch.no_grad():
        torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-6)
    iq = lin.input_quantizer
    assert iq.channel_wise is False and iq.inited
    assert iq.delta.dim() == 0 and iq.delta.item() == pytest.approx(0.2, rel=1e-6)
    assert iq.zero_point.dim() == 0 and iq.zero_point.item() == pytest.approx(7 / 3, rel=1e-6)
    assert lin.weight_quantizer.inited is False


def test_reparameterize_pair_needs_calibrated_channelwise_input():
    norm, lin = _pair()
    lin.input_quantizer.inited = False
    with pytest.raises(RuntimeError, match='calibrated channel-wise input quantizer'):
        reparameterize_pair(norm, lin)


def _reparam_layers(model):
    return [lin for _, lin in norm_linear_pairs(model)]


def _expected_pairs(model):
    if hasattr(model, 'layers'):  # Swin
        return (2 * sum(len(layer.blocks) for layer in model.layers)
                + sum(layer.downsample is not None for layer in model.layers))
    return 2 * len(model.blocks)


def _check_reparam_keeps_function(model):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        quantize_model(model, W_BITS, A_BITS)
        pairs = norm_linear_pairs(model)
        assert len(pairs) == _expected_pairs(model)
        set_quant_state(model, True, True)
        model(x)
        assert all(q.inited for _, q in quantizers(model))
        set_quant_state(model, False, False)
        ref = model(x)
        old = {id(lin): (lin.input_quantizer.delta.clone(), lin.input_quantizer.zero_point.clone())
               for _, lin in pairs}
        for _, lin in pairs:
            d, z = old[id(lin)]
            assert d.shape == (1, 1, lin.in_features) and z.shape == (1, 1, lin.in_features)
            assert lin.input_quantizer.channel_wise
        untouched = {name: (q.delta.clone(), q.inited) for name, q in quantizers(model)
                     if not any(name.startswith(n + '.') for n, m in model.named_modules()
                                if any(m is lin for _, lin in pairs))}
        assert reparameterize(model) == len(pairs)
        out = model(x)
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max().item()
    assert not torch.equal(out, torch.zeros_like(out))
    for _, lin in pairs:
        d, z = old[id(lin)]
        iq = lin.input_quantizer
        assert iq.channel_wise is False and iq.inited
        assert iq.delta.dim() == 0 and iq.zero_point.dim() == 0
        assert torch.equal(iq.delta, d.mean()) and torch.equal(iq.zero_point, z.mean())
        assert lin.weight_quantizer.inited is False
        assert lin.bias is not None
    # the other quantizers keep their calibration
    for name, q in quantizers(model):
        if name in untouched:
            assert q.inited and torch.equal(q.delta, untouched[name][0])
    return pairs


def test_reparam_keeps_function_vit(tiny_vit):
    _check_reparam_keeps_function(tiny_vit)


def test_reparam_keeps_function_distilled_deit(tiny_deit_distilled):
    _check_reparam_keeps_function(tiny_deit_distilled)


def test_reparam_keeps_function_swin_incl_patch_merging(tiny_swin):
    red = tiny_swin.layers[0].downsample.reduction
    assert red.bias is None
    _check_reparam_keeps_function(tiny_swin)
    red = tiny_swin.layers[0].downsample.reduction
    assert isinstance(red.bias, nn.Parameter) and red.bias.shape == (red.out_features,)
    assert any(p is red.bias for p in tiny_swin.parameters())
    assert 'layers.0.downsample.reduction.bias' in tiny_swin.state_dict()


def test_reparameterised_zero_point_is_unrounded_mean():
    norm, lin = _pair()
    reparameterize_pair(norm, lin)
    assert lin.input_quantizer.zero_point.item() != round(lin.input_quantizer.zero_point.item())


@pytest.mark.parametrize('which', ['tiny_vit', 'tiny_deit_distilled', 'tiny_swin'])
def test_repq_vit_end_to_end(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fp = model(x)
    out_model = repq_vit(model, x, W_BITS, A_BITS)
    assert out_model is model
    assert not model.training
    qs = quantizers(model)
    assert len(qs) > 0 and all(q.inited for _, q in qs)
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
    assert all(m.use_input_quant for m in layers)
    assert all(m.use_weight_quant for m in layers if not isinstance(m, QuantMatMul))
    for _, lin in norm_linear_pairs(model):
        assert lin.input_quantizer.channel_wise is False and lin.input_quantizer.delta.dim() == 0
        # step (3): the weight quantizer was re-calibrated on the reparameterised weight
        d, z = search_uniform_channelwise(lin.weight.detach(), W_BITS)
        assert torch.equal(lin.weight_quantizer.delta, d) and torch.equal(lin.weight_quantizer.zero_point, z)
    with torch.no_grad():
        q = model(x)
    assert q.shape == fp.shape and torch.isfinite(q).all()
    assert (q - fp).abs().max().item() > 1e-3



def _record_calibrations(monkeypatch):
    """[(quantizer, its calibration input, channel-wise then)] in call order."""
    seen = []
    for cls in (UniformQuantizer, LogSqrt2Quantizer):
        def spy(self, x, real=cls.calibrate):
            seen.append((self, x.detach().clone(), getattr(self, 'channel_wise', False)))
            return real(self, x)
        monkeypatch.setattr(cls, 'calibrate', spy)
    return seen


def _channels(x):
    """Per-channel values as SPEC §2 groups them: last dim of [B, N, C], dim 0 of weights."""
    return [x[..., c] for c in range(x.shape[-1])] if x.dim() == 3 else list(x)


def _check_against(choice, delta, zero_point=None):
    """Whether the library's (delta, zero point) is the reference's; an ambiguous choice is not held
    against it (returns None)."""
    if choice.ambiguous:
        return None
    ok = delta == pytest.approx(choice.delta, rel=1e-5)
    return ok and (zero_point is None or zero_point == choice.zero_point)


@pytest.mark.parametrize('which', ['tiny_vit', 'tiny_swin'])
def test_repq_vit_matches_float64_reference(which, request, monkeypatch):
    """Every quantizer's final parameters against tests/reference.py (float64 numpy) on the input it was
    calibrated on; the reparameterised inputs get the mean of the reference per-channel parameters, and
    their layer's weight is the original times r_c = delta_c / mean(delta)."""
    model = request.getfixturevalue(which)
    seen = _record_calibrations(monkeypatch)
    torch.manual_seed(2)
    repq_vit(model, torch.randn(4, 3, 32, 32), W_BITS, A_BITS)
    first, last = {}, {}
    for q, x, channel_wise in seen:
        first.setdefault(id(q), (x, channel_wise))
        last[id(q)] = (x, channel_wise)
    reparam = {id(lin.input_quantizer): lin for _, lin in norm_linear_pairs(model)}
    results = []
    for name, q in quantizers(model):
        x, channel_wise = last[id(q)]
        if isinstance(q, LogSqrt2Quantizer):
            results.append(_check_against(reference.log_sqrt2_search(x.numpy(), q.n_bits), q.delta.item()))
        elif id(q) in reparam:
            assert channel_wise and not q.channel_wise, name
            choices = [reference.uniform_search(c.numpy(), q.n_bits) for c in _channels(x)]
            if any(c.ambiguous for c in choices):
                results.append(None)
                continue
            deltas = np.array([c.delta for c in choices])
            results.append(q.delta.item() == pytest.approx(deltas.mean(), rel=1e-5)
                           and q.zero_point.item() == pytest.approx(np.mean([c.zero_point for c in choices]),
                                                                     abs=1e-5))
            lin = reparam[id(q)]
            w_old, w_new = first[id(lin.weight_quantizer)][0], last[id(lin.weight_quantizer)][0]
            torch.testing.assert_close(w_new.double(), w_old.double() * torch.from_numpy(deltas / deltas.mean()),
                                       rtol=1e-5, atol=1e-7)
            assert torch.equal(w_new, lin.weight.detach())
        elif channel_wise:
            assert q.delta.numel() == len(_channels(x)), name
            for c, values in enumerate(_channels(x)):
                results.append(_check_against(reference.uniform_search(values.numpy(), q.n_bits),
                                              q.delta.reshape(-1)[c].item(), q.zero_point.reshape(-1)[c].item()))
        else:
            results.append(_check_against(reference.uniform_search(x.numpy(), q.n_bits), q.delta.item(),
                                          q.zero_point.item()))
    checked = [r for r in results if r is not None]
    assert all(checked), f'{checked.count(False)} of {len(checked)} parameters differ from the reference'
    assert len(checked) > 0.9 * len(results) > 100


def test_repq_vit_per_channel_loop_gives_same_result(tiny_vit):
    other = copy.deepcopy(tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    timings = {}
    repq_vit(tiny_vit, x, W_BITS, A_BITS, timings=timings)
    assert set(timings) == {'calibrate', 'reparameterize', 'recalibrate'}
    repq_vit(other, x, W_BITS, A_BITS, per_channel_loop=True)
    uniform = [m for m in other.modules() if isinstance(m, UniformQuantizer)]
    assert uniform and all(m.per_channel_loop for m in uniform)
    assert not any(m.per_channel_loop for m in tiny_vit.modules() if isinstance(m, UniformQuantizer))
    pairs = list(zip(quantizers(tiny_vit), quantizers(other)))
    assert len(pairs) == 40
    for (name, a), (_, b) in pairs:
        assert torch.equal(a.delta, b.delta), name
        if isinstance(a, UniformQuantizer):
            assert torch.equal(a.zero_point, b.zero_point) and a.channel_wise is b.channel_wise, name


def test_repq_vit_leaves_every_module_in_eval_mode(tiny_vit):
    repq_vit(tiny_vit, torch.randn(2, 3, 32, 32), W_BITS, A_BITS)
    training = [n for n, m in tiny_vit.named_modules() if m.training]
    assert training == []
