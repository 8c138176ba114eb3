"""QwT compensation (quant/qwt.py, SPEC §3) on tiny RepQ-ViT W4/A4 models: ViT, distilled DeiT, Swin."""
import copy
import dataclasses
import functools
import importlib

import numpy as np
import pytest
import torch

import models
import quant
from conftest import make_tiny_swin, make_tiny_vit
from quant.layers import set_quant_state
from quant.qwt import CompensatedBlock, compensated_blocks, qwt_compensate, set_compensation
from quant.regression import NormalEquations, fit_concat, r2_score, solve_normal

qwt_module = importlib.import_module('quant.qwt_linear')  # the token-wise kind's fit

KINDS = ('vit', 'deit', 'swin')
BLOCK_DIMS = {'vit': [48] * 3, 'deit': [48] * 3, 'swin': [24, 24, 48, 48]}
# Swin's first block reads a LayerNorm output: sum_c (x_c - beta_c) / gamma_c = 0 for every token, so
# [X, 1] is rank deficient and the float32 inverse is meaningless there (the r² rule then zeroes it);
# the shared Swin run uses 'lstsq' so that block 0 is compensated too.
SHARED_SOLVER = {'vit': 'inverse', 'deit': 'inverse', 'swin': 'lstsq'}


def _build(kind):
    if kind == 'swin':
        return make_tiny_swin(seed=0)
    return make_tiny_vit(seed=0, distilled=kind == 'deit')


def _own_copy(case):
    """The cached case with its own model, tensors and stats: no test sees another's changes."""
    return {k: copy.deepcopy(v) if isinstance(v, (torch.nn.Module, torch.Tensor, list)) else v
            for k, v in case.items()}


@functools.lru_cache(maxsize=None)
def _cached_quantized(kind):
    model = _build(kind)
    g = torch.Generator().manual_seed(123)
    images = torch.randn(16, 3, 32, 32, generator=g)
    eval_images = torch.randn(4, 3, 32, 32, generator=g)
    quant.repq_vit(model, images[:8], 4, 4)
    with torch.no_grad():
        repq_out = model(eval_images)
    return dict(kind=kind, model=model, images=images, eval_images=eval_images, repq_out=repq_out)


def _quantized(kind):
    """RepQ-ViT W4/A4 model of ``kind`` (fitted once per session) and its data, a copy per call."""
    return _own_copy(_cached_quantized(kind))


@functools.lru_cache(maxsize=None)
def _cached_compensated(kind):
    q = _quantized(kind)
    stats = []
    qwt_compensate(q['model'], q['images'], batch_size=8, solver=SHARED_SOLVER[kind], stats=stats)
    return dict(q, stats=stats)


def _compensated(kind):
    return _own_copy(_cached_compensated(kind))


@pytest.fixture(params=KINDS)
def quantized(request):
    return _quantized(request.param)


@pytest.fixture(params=KINDS)
def compensated(request):
    return _compensated(request.param)


def _block_slots(model):
    return [s for s in models.walk(model) if s.kind == 'block']


def _fp_q(block, x):
    set_quant_state(block, False, False)
    fp = block(x)
    set_quant_state(block, True, True)
    return fp, block(x)


def test_every_block_wrapped_in_walk_order(compensated):
    model, stats, kind = compensated['model'], compensated['stats'], compensated['kind']
    slots = _block_slots(model)
    assert len(slots) == len(BLOCK_DIMS[kind])
    assert [s['block'] for s in stats] == list(range(len(slots)))
    assert compensated_blocks(model) == [s.module for s in slots]
    for slot, dim in zip(slots, BLOCK_DIMS[kind]):
        comp = slot.module
        assert isinstance(comp, CompensatedBlock)
        assert not isinstance(comp.block, CompensatedBlock)
        assert comp.comp_weight.shape == (dim, dim) and comp.comp_bias.shape == (dim,)
        assert comp.comp_weight.dtype == torch.float32
        assert not comp.comp_weight.requires_grad and not comp.comp_bias.requires_grad
    for slot in models.walk(model):
        if slot.kind == 'merge':  # PatchMerging is run, not compensated
            assert not isinstance(slot.module, CompensatedBlock)
    assert all(s['used'] and s['r2'] > 0 for s in stats)
    assert all(s['fallback'] is None for s in stats)


@pytest.mark.parametrize('kind,accumulate', [('vit', 'normal'), ('vit', 'concat'), ('deit', 'normal'),
                                             ('swin', 'normal'), ('swin', 'concat')])
def test_start_block(kind, accumulate):
    quantized = _quantized(kind)
    # Swin: block 2 is the first block of stage 1; counted per stage, block 3 would be < 3 too.
    start = 3 if kind == 'swin' else 1
    model = copy.deepcopy(quantized['model'])
    stats = []
    qwt_compensate(model, quantized['images'], start_block=start, batch_size=8, accumulate=accumulate, stats=stats)
    comps = [s.module for s in _block_slots(model)]
    assert len(stats) == len(comps) == len(BLOCK_DIMS[kind])
    assert [s['fallback'] for s in stats] == [None] * len(comps)
    for i, (comp, st) in enumerate(zip(comps, stats)):
        assert st['block'] == i
        if i < start:
            assert not comp.comp_weight.any() and not comp.comp_bias.any(), f'block {i} < start_block {start}'
            assert st['used'] is False
        else:
            assert comp.comp_weight.abs().sum() > 0 and comp.comp_bias.abs().sum() > 0, f'block {i}'
            assert st['used'] is True and st['r2'] > 0


def test_start_block_beyond_depth_gives_the_repq_model(quantized, capsys):
    model = copy.deepcopy(quantized['model'])
    stats, timings = [], {}
    qwt_compensate(model, quantized['images'], start_block=100, batch_size=8, stats=stats, timings=timings)
    assert set(timings) == {'passes', 'fit'}  # seconds of each stage (their values are not checked)
    assert capsys.readouterr().err == ''  # no progress bar unless asked for
    assert [s['used'] for s in stats] == [False] * len(BLOCK_DIMS[quantized['kind']])
    with torch.no_grad():
        assert torch.equal(model(quantized['eval_images']), quantized['repq_out'])


@pytest.mark.parametrize('accumulate,patched', [('normal', 'solve_normal'), ('concat', 'fit_concat')])
def test_fit_with_nonpositive_r2_gets_zeros(monkeypatch, accumulate, patched):
    """Block 1's solver returns a useless (W, b): the library's r² rule must reject it, and block 2
    must then be fitted on block 1's plain quantized output."""
    quantized = _quantized('vit')
    real = getattr(qwt_module, patched)
    calls = []

    def bad_on_block_1(*args, **kwargs):
        w, b = real(*args, **kwargs)
        calls.append(len(calls))
        if len(calls) == 2:
            return torch.zeros_like(w), torch.full_like(b, 50.0)  # far off: r² << 0
        return w, b

    monkeypatch.setattr(qwt_module, patched, bad_on_block_1)
    model = copy.deepcopy(quantized['model'])
    stats = []
    qwt_compensate(model, quantized['images'], batch_size=8, accumulate=accumulate, stats=stats)
    assert len(calls) == 3
    assert stats[1]['r2'] <= 0 and stats[1]['used'] is False
    assert stats[0]['used'] and stats[2]['used'] and stats[0]['r2'] > 0 and stats[2]['r2'] > 0
    assert [s['fallback'] for s in stats] == [None] * 3  # a poor fit is no failed solve
    comps = compensated_blocks(model)
    assert not comps[1].comp_weight.any() and not comps[1].comp_bias.any()
    assert comps[0].comp_weight.any() and comps[2].comp_weight.any()

    # Reference: features propagated by hand, block 1 uncompensated.
    with torch.no_grad():
        set_quant_state(model, True, True)
        x = models.stem(model, quantized['images'])
        x = comps[0].forward_fp32(x)
        _, x = _fp_q(comps[1].block, x)
        fp, q = _fp_q(comps[2].block, x)
        w_ref, b_ref = fit_concat(x.reshape(-1, 48), (fp - q).reshape(-1, 48), 'lstsq')
    scale = float(w_ref.abs().max())
    torch.testing.assert_close(comps[2].comp_weight, w_ref, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(comps[2].comp_bias, b_ref, rtol=0, atol=1e-4 * scale)


class _OffsetBlock(torch.nn.Module):
    """A stand-in block: full precision 2x (its first ``offset.shape[-1]`` features), quantized that
    minus ``offset``, so the QwT target Y is ``offset`` whatever X is. A QuantMatMul child carries
    the quantization switch."""

    def __init__(self, offset):
        super().__init__()
        from quant.layers import QuantMatMul
        from quant.quantizers import UniformQuantizer
        self.switch = QuantMatMul(UniformQuantizer(8), UniformQuantizer(8))
        self.offset = offset

    def forward(self, x):
        fp = 2 * x[..., :self.offset.shape[-1]]
        return fp - self.offset if self.switch.use_input_quant else fp


def _lstsq_reference(xs, y):
    """(W, b, r², rms) of [X, 1] -> Y in float64 numpy, over all tokens of the batches ``xs``."""
    x64 = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double().numpy()
    y64 = y.reshape(-1, y.shape[-1]).double().numpy()
    a = np.hstack([x64, np.ones((len(x64), 1))])
    sol = np.linalg.lstsq(a, y64, rcond=None)[0]
    res = y64 - a @ sol
    r2 = 1 - (res ** 2).sum() / ((y64 - y64.mean(0)) ** 2).sum()
    return torch.from_numpy(sol[:-1]), torch.from_numpy(sol[-1]), r2, np.sqrt((res ** 2).mean())


def _gate_case(seed=5, batches=2, tokens=10, c=4):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, tokens, c, generator=g) for _ in range(batches)]
    return xs, torch.randn(8, tokens, c, generator=g)


def _fit(accumulate, block, xs, solver='inverse'):
    from utils.core.timing import Stopwatch
    fit = qwt_module._fit_block_normal if accumulate == 'normal' else qwt_module._fit_block_concat
    return fit(block, [x.clone() for x in xs], True, solver, Stopwatch('cpu', ('passes', 'fit')))


@pytest.mark.parametrize('accumulate', ['normal', 'concat'])
def test_r2_gate_keeps_any_positive_fit_even_of_noise(accumulate):
    """Y pure noise, unrelated to X: in sample, least squares still explains a little of it (r² ≈
    (C + 1) / tokens > 0), and the published gate is r² > 0, not a significance test: the fit is used."""
    xs, noise = _gate_case()
    fit = _fit(accumulate, _OffsetBlock(noise), xs)
    x64 = torch.cat(xs).reshape(-1, 4).double().numpy()
    y64 = noise.repeat(2, 1, 1).reshape(-1, 4).double().numpy()
    a = np.hstack([x64, np.ones((len(x64), 1))])
    sol = np.linalg.lstsq(a, y64, rcond=None)[0]
    r2_ref = 1 - ((y64 - a @ sol) ** 2).sum() / ((y64 - y64.mean(0)) ** 2).sum()
    assert 0 < r2_ref < 0.1
    assert fit.r2 == pytest.approx(r2_ref, abs=1e-5)
    assert fit.rms == pytest.approx(np.sqrt(((y64 - a @ sol) ** 2).mean()), rel=1e-5)  # over tokens and outputs
    assert fit.fallback is None
    torch.testing.assert_close(fit.weight.double(), torch.from_numpy(sol[:-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(fit.bias.double(), torch.from_numpy(sol[-1]), rtol=0, atol=1e-5)
    for x, out in zip(xs, fit.outs):  # the next features: quantized output plus the compensation
        torch.testing.assert_close(out, 2 * x - noise + x @ fit.weight + fit.bias)


@pytest.mark.parametrize('accumulate', ['normal', 'concat'])
@pytest.mark.parametrize('batches', [1, 3])
def test_fit_of_a_width_changing_block(accumulate, batches):
    """4 features in, 3 out, one batch or three: W [4, 3] and b [3] are the float64 least-squares fit
    of the offset, and the next features the quantized outputs plus x @ W + b. Not fitted: zeros of
    those shapes and the plain quantized outputs."""
    xs, noise = _gate_case(seed=8, batches=batches)
    noise = noise[..., :3] + torch.linspace(-1, 1, 3)
    block = _OffsetBlock(noise)
    y = noise.repeat(batches, 1, 1)
    w_ref, b_ref, r2_ref, rms_ref = _lstsq_reference(xs, y)
    fit = _fit(accumulate, block, xs)
    assert fit.weight.shape == (4, 3) and fit.bias.shape == (3,) and len(fit.outs) == batches
    torch.testing.assert_close(fit.weight.double(), w_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fit.bias.double(), b_ref, rtol=0, atol=1e-5)
    assert fit.r2 == pytest.approx(r2_ref, abs=1e-5) and fit.rms == pytest.approx(rms_ref, rel=1e-5)
    for x, out in zip(xs, fit.outs):
        torch.testing.assert_close(out, 2 * x[..., :3] - noise + x @ fit.weight + fit.bias)
    from utils.core.timing import Stopwatch
    fit_fn = qwt_module._fit_block_normal if accumulate == 'normal' else qwt_module._fit_block_concat
    set_quant_state(block, False, False)  # the fit switches the block's quantization on itself
    skipped = fit_fn(block, [x.clone() for x in xs], False, 'inverse', Stopwatch('cpu', ('passes', 'fit')))
    assert skipped.weight.shape == (4, 3) and skipped.bias.shape == (3,)
    assert not skipped.weight.any() and not skipped.bias.any()
    assert all(torch.equal(out, 2 * x[..., :3] - noise) for x, out in zip(xs, skipped.outs))


@pytest.mark.parametrize('accumulate', ['normal', 'concat'])
def test_fallbacks_with_one_batch_of_a_width_changing_block(accumulate, monkeypatch, capsys):
    """One batch, 4 features in, 3 out. The inverse fails: float64 least squares of the same tokens.
    Targets with a NaN: no finite fit, zeros of shape [4, 3] and the plain quantized output."""
    xs, noise = _gate_case(seed=11, batches=1)
    offset = noise[..., :3]
    w_ref, b_ref, r2_ref, _ = _lstsq_reference(xs, offset)
    name = 'solve_normal' if accumulate == 'normal' else 'fit_concat'
    real = getattr(qwt_module, name)

    def failing_inverse(a, b, solver='inverse'):
        if solver == 'inverse':
            raise torch.linalg.LinAlgError('forced by the test')
        return real(a, b, solver)
    monkeypatch.setattr(qwt_module, name, failing_inverse)
    fit = _fit(accumulate, _OffsetBlock(offset), xs)
    assert fit.fallback == qwt_module.Fallback('lstsq', 'singular', 80, 5, None)
    torch.testing.assert_close(fit.weight.double(), w_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fit.bias.double(), b_ref, rtol=0, atol=1e-5)
    assert fit.r2 == pytest.approx(r2_ref, abs=1e-5)
    bad = offset.clone()
    bad[0, 0, 0] = float('nan')
    fit = _fit(accumulate, _OffsetBlock(bad), xs)
    assert fit.fallback.kind == 'zero' and fit.r2 is None
    assert fit.weight.shape == (4, 3) and fit.bias.shape == (3,) and not fit.weight.any() and not fit.bias.any()
    torch.testing.assert_close(fit.outs[0], 2 * xs[0][..., :3] - bad, rtol=0, atol=0, equal_nan=True)
    assert capsys.readouterr().err == ''  # no progress bar unless asked for


def test_normal_path_measures_ss_res_on_the_tokens_when_the_moments_cancel(monkeypatch):
    """Where moment_ss_res declines (None), SS_res comes from the tokens: the same r², rms and W."""
    xs, noise = _gate_case(seed=9, batches=2)
    w_ref, b_ref, r2_ref, rms_ref = _lstsq_reference(xs, noise.repeat(2, 1, 1))
    monkeypatch.setattr(qwt_module, 'moment_ss_res', lambda *args: None)
    fit = _fit('normal', _OffsetBlock(noise), xs)
    assert fit.r2 == pytest.approx(r2_ref, abs=1e-6) and fit.rms == pytest.approx(rms_ref, rel=1e-6)
    torch.testing.assert_close(fit.weight.double(), w_ref, rtol=0, atol=1e-5)
    for x, out in zip(xs, fit.outs):
        torch.testing.assert_close(out, 2 * x - noise + x @ fit.weight + fit.bias)


def test_attempt_flags_any_non_finite_entry():
    w, b = torch.ones(3, 2), torch.ones(2)
    assert qwt_module._attempt(lambda: (w, b)) == ((w, b), None)
    w_nan, b_inf = w.clone(), b.clone()
    w_nan[1, 0], b_inf[1] = float('nan'), float('inf')
    assert qwt_module._attempt(lambda: (w_nan, b)) == (None, 'non-finite solution')
    assert qwt_module._attempt(lambda: (w, b_inf)) == (None, 'non-finite solution')
    fallback = qwt_module.Fallback('lstsq', 'singular', 10, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fallback.kind = 'zero'


def test_moment_ss_res_hand_values():
    """SS_res = ΣY² - 2<W1, rhs> + <W1, gram W1>: with gram = rhs = W1 = [[1]] that is ΣY² - 1. It is
    trusted (float64) when at least 1e-2 of |ΣY²| + 2|cross| + |quad|: ΣY² = 1.05 gives 0.05 (bound
    0.0405); ΣY² = 1.03 gives 0.03 < 0.0403: None, measure on the tokens instead."""
    one = torch.ones(1, 1)
    got = qwt_module.moment_ss_res(one, one, torch.tensor(1.05, dtype=torch.float64), one)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(0.05, abs=1e-12)
    assert qwt_module.moment_ss_res(one, one, torch.tensor(1.03, dtype=torch.float64), one) is None
    # gram = [[1]], rhs = [[2]], W1 = [[2]]: cross 4, quad 4, SS_res = ΣY² - 4 against 0.01 (ΣY² + 12):
    # ΣY² = 4.2 gives 0.2 >= 0.162; ΣY² = 4.14 gives 0.14 < 0.1614
    two = torch.full((1, 1), 2.0)
    assert float(qwt_module.moment_ss_res(one, two, torch.tensor(4.2, dtype=torch.float64), two)) == \
        pytest.approx(0.2, abs=1e-12)
    assert qwt_module.moment_ss_res(one, two, torch.tensor(4.14, dtype=torch.float64), two) is None
    # two unknowns, two outputs: gram = diag(2, 3), rhs = [[1, 0], [0, 2]], W1 = [[0.5, 0], [0, 1]]:
    # cross = 0.5 + 2 = 2.5, quad = 2 * 0.25 + 3 * 1 = 3.5, ΣY² = 4: SS_res = 4 - 5 + 3.5 = 2.5
    got = qwt_module.moment_ss_res(torch.diag(torch.tensor([2.0, 3.0])), torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
                                   torch.tensor(4.0, dtype=torch.float64), torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    assert float(got) == pytest.approx(2.5, abs=1e-12)


def test_r2_gate_rejects_a_fit_no_better_than_the_mean(monkeypatch):
    """concat: a solver returning W = 0, b = mean(Y) scores r² = 0 exactly, which the gate (r² > 0)
    rejects: zeros, and the next features are the plain quantized outputs."""
    xs, noise = _gate_case(seed=6)
    monkeypatch.setattr(qwt_module, 'fit_concat', lambda x, y, solver: (torch.zeros(x.shape[1], y.shape[1]),
                                                                        y.mean(dim=0)))
    fit = _fit('concat', _OffsetBlock(noise), xs)
    assert fit.r2 == 0.0
    assert not fit.weight.any() and not fit.bias.any()
    assert all(torch.equal(out, 2 * x - noise) for x, out in zip(xs, fit.outs))


def test_r2_gate_rejects_r2_of_exactly_zero_from_normal_equations(monkeypatch):
    """normal: integer targets over 128 tokens make every sum exact, so W = 0, b = mean(Y) gives
    SS_res = SS_tot exactly: r² = 0, rejected (the gate is r² > 0)."""
    xs, _ = _gate_case(seed=10, batches=2, tokens=8)
    offset = torch.randint(-3, 4, (8, 8, 3), generator=torch.Generator().manual_seed(10)).float()
    mean = offset.repeat(2, 1, 1).reshape(-1, 3).mean(0)
    assert torch.equal(mean * 128, offset.repeat(2, 1, 1).reshape(-1, 3).sum(0))  # exact
    monkeypatch.setattr(qwt_module, 'solve_normal', lambda gram, rhs, solver: (torch.zeros(4, 3), mean))
    fit = _fit('normal', _OffsetBlock(offset), xs)
    assert fit.r2 == 0.0
    assert fit.weight.shape == (4, 3) and fit.bias.shape == (3,)  # 4 features in, 3 out
    assert not fit.weight.any() and not fit.bias.any()
    assert all(torch.equal(out, 2 * x[..., :3] - offset) for x, out in zip(xs, fit.outs))


def test_r2_gate_rejects_a_negative_r2_from_normal_equations(monkeypatch):
    """normal: W = 0 and b = mean(Y) + 0.01 std(Y) per column: SS_res = SS_tot (1 + 0.01²), so r² =
    -1e-4 by hand; rejected."""
    xs, noise = _gate_case(seed=7)
    y = noise.repeat(2, 1, 1).reshape(-1, 4).double()
    b = (y.mean(0) + 0.01 * y.std(0, unbiased=False)).float()
    monkeypatch.setattr(qwt_module, 'solve_normal', lambda gram, rhs, solver: (torch.zeros(4, 4), b))
    fit = _fit('normal', _OffsetBlock(noise), xs)
    assert fit.r2 == pytest.approx(-1e-4, rel=1e-2)
    assert not fit.weight.any() and not fit.bias.any()
    assert all(torch.equal(out, 2 * x - noise) for x, out in zip(xs, fit.outs))


def test_compensation_lowers_every_block_error(compensated):
    """Propagating the fitting images by hand (float32 form), each compensated block is closer to
    the full-precision block than the quantized block, and r² matches the reported one."""
    model, stats, images = compensated['model'], compensated['stats'], compensated['images']
    set_quant_state(model, True, True)
    i = 0
    with torch.no_grad():
        x = models.stem(model, images)
        for slot in models.walk(model):
            if slot.kind == 'merge':
                x = slot.module(x)
                continue
            comp = slot.module
            fp, q = _fp_q(comp.block, x)
            out = comp.forward_fp32(x)
            err_q = float((fp - q).pow(2).sum())
            err_c = float((fp - out).pow(2).sum())
            y = (fp - q).reshape(-1, fp.shape[-1])
            ss_tot = float((y - y.mean(0)).pow(2).sum())
            assert err_q > 0, 'quantization changed nothing'
            assert stats[i]['used']
            assert err_c < err_q, f'block {i}: {err_c} >= {err_q}'
            assert 1 - err_c / ss_tot == pytest.approx(stats[i]['r2'], abs=1e-4)
            torch.testing.assert_close(out, q + x @ comp.comp_weight + comp.comp_bias)
            x = out
            i += 1
    assert i == len(stats)


def _first_block_and_input(compensated, images_key):
    """The first CompensatedBlock (quantization on) and its input X0 on ``compensated[images_key]``."""
    model = compensated['model']
    set_quant_state(model, True, True)
    with torch.no_grad():
        return _block_slots(model)[0].module, models.stem(model, compensated[images_key])


def test_block0_compensation_lowers_error(compensated):
    comp, x0 = _first_block_and_input(compensated, 'images')
    with torch.no_grad():
        fp, q = _fp_q(comp.block, x0)
        err_q = (fp - q).pow(2).sum()
        err_c = (fp - (q + x0 @ comp.comp_weight + comp.comp_bias)).pow(2).sum()
        err_half = (fp - comp(x0)).pow(2).sum()  # the inference form
    assert err_c < err_q
    assert err_half < err_q


def _solver_tol(kind, solver):
    # Swin's stage-1 features are far worse conditioned than the ViT's: the float32 inverse
    # reproduces W only to ~1e-4 of its scale there.
    return 1e-3 if (kind == 'swin' and solver == 'inverse') else 1e-4


@pytest.mark.parametrize('kind,solver', [('vit', 'inverse'), ('vit', 'lstsq'), ('deit', 'inverse'),
                                         ('swin', 'inverse'), ('swin', 'lstsq')])
def test_normal_and_concat_agree(kind, solver):
    quantized = _quantized(kind)
    # Swin: stages 0 reads (near-)collinear LayerNorm features where W is not determined to float
    # tolerance; compare the blocks after PatchMerging.
    start = 2 if kind == 'swin' else 0
    results = {}
    for accumulate in ('normal', 'concat'):
        model = copy.deepcopy(quantized['model'])
        stats = []
        qwt_compensate(model, quantized['images'], start_block=start, batch_size=8, solver=solver,
                       accumulate=accumulate, stats=stats)
        results[accumulate] = (compensated_blocks(model), stats)
    (normal, s_n), (concat, s_c) = results['normal'], results['concat']
    assert [s['used'] for s in s_n] == [s['used'] for s in s_c]
    assert all(s['fallback'] is None for s in s_n + s_c)
    assert sum(s['used'] for s in s_n) == len(BLOCK_DIMS[kind]) - start
    tol = _solver_tol(kind, solver)
    for i, (a, b) in enumerate(zip(normal, concat)):
        scale = max(float(a.comp_weight.abs().max()), 1e-8)
        torch.testing.assert_close(a.comp_weight, b.comp_weight, rtol=0, atol=tol * scale, msg=f'block {i} W')
        torch.testing.assert_close(a.comp_bias, b.comp_bias, rtol=0, atol=tol * scale, msg=f'block {i} b')
        if s_n[i]['used']:
            assert s_n[i]['r2'] == pytest.approx(s_c[i]['r2'], abs=1e-4)


def test_unknown_accumulate_raises():
    quantized = _quantized('vit')
    with pytest.raises(ValueError, match="'gather'"):
        qwt_compensate(copy.deepcopy(quantized['model']), quantized['images'], accumulate='gather')


def test_compensated_block_forward_is_half_precision_form_hand_values():
    """x = [1 + 2^-12, 0.5] and W = diag(3, 1 + 2^-12) are [1, 0.5] and diag(3, 1) in half precision.
    Inference: x + [3, 0.5] + b; the float32 form used while fitting: x + [3 + 3 * 2^-12, 0.5 + 2^-13] + b."""
    x = torch.tensor([[[1 + 2 ** -12, 0.5]]])
    comp = CompensatedBlock(torch.nn.Identity().eval(), torch.tensor([[3.0, 0.0], [0.0, 1 + 2 ** -12]]),
                            torch.tensor([0.25, -1.0]))
    with torch.no_grad():
        got, fp32 = comp(x), comp.forward_fp32(x)
    assert got.dtype == torch.float32 and got.shape == (1, 1, 2)
    assert got.tolist() == [[[1 + 2 ** -12 + 3 + 0.25, 0.0]]]
    assert fp32.tolist() == [[[1 + 2 ** -12 + 3 + 3 * 2 ** -12 + 0.25, 2 ** -13]]]
    comp.enabled = False
    with torch.no_grad():
        assert torch.equal(comp(x), x)


def test_compensated_block_training_branch_is_float32_with_exact_gradients():
    """The published training branch (QwT*): in training mode the product runs in float32 with the bias,
    x + x @ W + b = [1 + 2^-12 + 3 + 3 * 2^-12 + 0.25, 2^-13] (hand values of the test above), and the
    gradient of the summed output is dL/dW = x^T 1 = [[1 + 2^-12, 1 + 2^-12], [0.5, 0.5]], dL/db = [1, 1].
    Back in eval mode: the half-precision form again."""
    x = torch.tensor([[[1 + 2 ** -12, 0.5]]])
    comp = CompensatedBlock(torch.nn.Identity().eval(), torch.tensor([[3.0, 0.0], [0.0, 1 + 2 ** -12]]),
                            torch.tensor([0.25, -1.0]))
    assert not comp.training and not comp.comp_weight.requires_grad and not comp.comp_bias.requires_grad
    comp.train()
    comp.comp_weight.requires_grad_(True)
    comp.comp_bias.requires_grad_(True)
    out = comp(x)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[1 + 2 ** -12 + 3 + 3 * 2 ** -12 + 0.25, 2 ** -13]]]
    out.sum().backward()
    assert comp.comp_weight.grad.tolist() == [[1 + 2 ** -12, 1 + 2 ** -12], [0.5, 0.5]]
    assert comp.comp_bias.grad.tolist() == [1.0, 1.0]
    comp.eval()
    with torch.no_grad():
        assert comp(x).tolist() == [[[1 + 2 ** -12 + 3 + 0.25, 0.0]]]
        comp.train()
        comp.enabled = False
        assert torch.equal(comp(x), x)


def test_compensated_block_inference_close_to_float32_form(compensated):
    comp, x = _first_block_and_input(compensated, 'eval_images')
    with torch.no_grad():
        got, fp32 = comp(x), comp.forward_fp32(x)
    assert not torch.equal(got, fp32)  # the half product is really used
    torch.testing.assert_close(got, fp32, rtol=0, atol=1e-2 * float(fp32.abs().max()))


def test_set_compensation_restores_repq_output(compensated):
    model, x = compensated['model'], compensated['eval_images']
    with torch.no_grad():
        on = model(x)
        set_compensation(model, False)
        try:
            assert all(not m.enabled for m in compensated_blocks(model))
            off = model(x)
        finally:
            set_compensation(model, True)
        again = model(x)
    assert torch.equal(off, compensated['repq_out'])
    assert not torch.equal(on, compensated['repq_out'])
    assert torch.equal(again, on)


def test_compensated_model_output_and_state_dict(compensated):
    model, kind = compensated['model'], compensated['kind']
    with torch.no_grad():
        out = model(compensated['eval_images'])
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    sd = model.state_dict()
    w_keys = sorted(k for k in sd if k.endswith('comp_weight'))
    b_keys = sorted(k for k in sd if k.endswith('comp_bias'))
    if kind == 'swin':
        assert w_keys == sorted(f'layers.{s}.blocks.{i}.comp_weight' for s in range(2) for i in range(2))
        assert 'layers.0.blocks.0.block.attn.qkv.weight' in sd
        assert 'layers.0.downsample.reduction.weight' in sd
    else:
        assert w_keys == [f'blocks.{i}.comp_weight' for i in range(3)]
        assert 'blocks.0.block.attn.qkv.weight' in sd
    assert len(b_keys) == len(w_keys)
    for k, dim in zip(sorted(w_keys, key=lambda k: list(sd).index(k)), BLOCK_DIMS[kind]):
        assert sd[k].shape == (dim, dim)

    # The state dict loads into a zeroed copy and reproduces the outputs exactly.
    other = copy.deepcopy(model)
    for comp in compensated_blocks(other):
        comp.comp_weight.data.zero_()
        comp.comp_bias.data.zero_()
    with torch.no_grad():
        assert not torch.equal(other(compensated['eval_images']), out)
    other.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(compensated['eval_images']), out)


@pytest.mark.parametrize('path,solver', [('concat', 'lstsq'), ('normal', 'lstsq'), ('normal', 'inverse'),
                                         ('concat', 'inverse')])
def test_block0_fit_survives_half_precision_inference(path, solver):
    """Swin block 0 reads a LayerNorm output, so [X, 1] is rank deficient in exact arithmetic.
    'lstsq' cuts the rounding-noise direction off: its fit explains part of Y, survives the fp16
    inference form and is used. The float32 inverse fits that direction with W ~ 1 that explains
    nothing (r² < 0): the r² rule rejects it and block 0 gets zero compensation."""
    q = _quantized('swin')
    model = q['model']
    set_quant_state(model, True, True)
    block = _block_slots(model)[0].module
    with torch.no_grad():
        x = models.stem(model, q['images'])
        fp, qo = _fp_q(block, x)
        x2, y2 = x.reshape(-1, x.shape[-1]), (fp - qo).reshape(-1, fp.shape[-1])
        if path == 'concat':
            w, b = fit_concat(x2, y2, solver)
        else:
            # as quant.qwt accumulates them: float64 sums for the float64 solver
            neq = NormalEquations(x2.shape[1], y2.shape[1], x2.device,
                                  torch.float64 if solver == 'lstsq' else torch.float32)
            neq.add(x2, y2)
            w, b = solve_normal(neq.gram, neq.rhs, solver)
        r2 = float(r2_score(y2, x2 @ w + b))
        err_q = float((fp - qo).pow(2).sum())
        err_half = float((fp - CompensatedBlock(block, w, b)(x)).pow(2).sum())
    stats = []
    qwt_compensate(model, q['images'], batch_size=8, solver=solver, accumulate=path, stats=stats)
    block0 = compensated_blocks(model)[0]
    if solver == 'lstsq':
        assert r2 > 0.1 and err_half < 0.9 * err_q, (r2, err_half, err_q)
        assert stats[0]['used'] and stats[0]['r2'] == pytest.approx(r2, abs=1e-3)
        torch.testing.assert_close(block0.comp_weight, w, rtol=0, atol=1e-4 * float(w.abs().max()))
    else:  # how bad depends on float32 summation order (r² -1e4 with 2 threads, -2.6 with 1): worse than none
        assert r2 < 0 and err_half > err_q, (r2, err_half, err_q)
        assert stats[0]['r2'] < 0 and stats[0]['used'] is False  # its own garbage fit of the batches
        assert not block0.comp_weight.any() and not block0.comp_bias.any()


def test_one_pass_evaluation_equals_two_passes():
    """Both models evaluated on each batch give the counts of two separate passes over the data."""
    from torch.utils.data import DataLoader, TensorDataset
    from quant import set_compensation
    from utils.run.evaluate import evaluate
    q = _quantized('vit')
    model = copy.deepcopy(q['model'])
    qwt_compensate(model, q['images'], batch_size=4)
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(22, 3, 32, 32, generator=g), torch.randint(0, 10, (22,), generator=g))
    loader = DataLoader(data, batch_size=4)

    def variant(enabled):
        def fn(x):
            set_compensation(model, enabled)
            return model(x)
        return fn
    both = evaluate({'repq': variant(False), 'qwt': variant(True)}, loader, torch.device('cpu'))
    alone = {**evaluate({'repq': variant(False)}, loader, torch.device('cpu')),
             **evaluate({'qwt': variant(True)}, loader, torch.device('cpu'))}
    assert both == alone
    assert both['repq']['count'] == 22
    with torch.no_grad():  # and the counts are the models' own
        x, y = data.tensors
        set_compensation(model, True)
        top1 = int((model(x).argmax(1) == y).sum())
    assert both['qwt']['correct1'] == top1


# --------------------------------------------------------------------------- failed solves: fallback
# A singular or non-finite system, or a non-finite solution, of one block: float64 least squares
# instead, recorded in stats['fallback'], one warning; where that fails too (inf/NaN data), zeros.

FAILURES = ('singular', 'non-finite matrix', 'non-finite solution')
WARNED_REASON = {'singular': 'is singular', 'non-finite matrix': 'system holds inf or NaN',
                 'non-finite solution': 'W, b hold inf or NaN'}


def _fail_block(monkeypatch, accumulate, failure, block=1):
    """Make the 'inverse' solve of block ``block`` (its ``block``-th call) fail as ``failure``; the
    'lstsq' fallback runs untouched. Returns the list of intercepted calls."""
    calls = []
    if failure == 'non-finite solution':  # the real solver path, with the inverse returning NaN
        real_inv = torch.inverse

        def inverse(a, *args, **kwargs):
            calls.append(a.shape)
            out = real_inv(a, *args, **kwargs)
            return torch.full_like(out, float('nan')) if len(calls) == block + 1 else out
        monkeypatch.setattr(torch, 'inverse', inverse)
        return calls
    name = 'solve_normal' if accumulate == 'normal' else 'fit_concat'
    real = getattr(qwt_module, name)

    def solve(a, b, solver='inverse'):
        if solver != 'inverse':
            return real(a, b, solver)
        calls.append(a.shape)
        if len(calls) != block + 1:
            return real(a, b, solver)
        if failure == 'singular':
            raise torch.linalg.LinAlgError('linalg.inv: The diagonal element 3 is zero')
        # the real check. concat: features ~1e20 overflow [X,1]^T[X,1] in float32. normal: the summed
        # gram itself becomes inf/NaN (in place, as an overflow would), so r² must not come from it.
        return real(a * 1e20, b, solver) if name == 'fit_concat' else real(a.mul_(float('inf')), b, solver)
    monkeypatch.setattr(qwt_module, name, solve)
    return calls


def _block1_tokens(model, images):
    """Block 1's input and target (fp - quantized), propagated by hand through compensated block 0."""
    comps = compensated_blocks(model)
    with torch.no_grad():
        set_quant_state(model, True, True)
        x = comps[0].forward_fp32(models.stem(model, images))
        fp, q = _fp_q(comps[1].block, x)
    return x.reshape(-1, x.shape[-1]), (fp - q).reshape(-1, fp.shape[-1])


def _qwt_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == 'quant.qwt' and r.levelname == 'WARNING']


@pytest.mark.parametrize('failure', FAILURES)
@pytest.mark.parametrize('accumulate', ('normal', 'concat'))
def test_failed_solve_falls_back_to_float64_lstsq(accumulate, failure, monkeypatch, caplog):
    """Block 1's published solve fails: it gets the fit --qwt_solver lstsq gives on the same tokens,
    with its own r², 'fallback' = 'lstsq', and one warning; blocks 0 and 2 are untouched."""
    q = _quantized('vit')
    calls = _fail_block(monkeypatch, accumulate, failure)
    model = copy.deepcopy(q['model'])
    stats = []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(model, q['images'], batch_size=8, accumulate=accumulate, stats=stats)
    assert len(calls) == 3  # one primary solve per block
    assert [s['fallback'] for s in stats] == [None, 'lstsq', None]
    assert all(s['used'] and s['r2'] > 0 for s in stats)

    x, y = _block1_tokens(model, q['images'])
    if accumulate == 'concat':
        w_ref, b_ref = fit_concat(x, y, 'lstsq')
    else:  # what quant.qwt accumulates for --qwt_solver lstsq
        neq = NormalEquations(x.shape[1], y.shape[1], x.device, torch.float64)
        for xb, yb in zip(x.split(8 * 17), y.split(8 * 17)):  # 8 images of 17 tokens per batch
            neq.add(xb, yb)
        w_ref, b_ref = solve_normal(neq.gram, neq.rhs, 'lstsq')
    comp = compensated_blocks(model)[1]
    scale = float(w_ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(comp.comp_weight, w_ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(comp.comp_bias, b_ref, rtol=0, atol=1e-5 * scale)
    assert stats[1]['r2'] == pytest.approx(float(r2_score(y, x @ w_ref + b_ref)), abs=1e-5)

    warnings = _qwt_warnings(caplog)
    assert len(warnings) == 1 and '\n' not in warnings[0]
    msg = warnings[0]
    assert msg.startswith('QwT block 1: ') and WARNED_REASON[failure] in msg
    assert '(272 tokens for 49 unknowns per output)' in msg  # 16 images x 17 tokens; 48 features + bias
    assert 'float64 least squares instead' in msg and 'zero compensation' not in msg
    assert '--qwt_samples' in msg and '--qwt_solver lstsq' in msg
    with torch.no_grad():
        out = model(q['eval_images'])
    assert torch.isfinite(out).all() and not torch.equal(out, q['repq_out'])


@pytest.mark.parametrize('where', ('features', 'targets'))
@pytest.mark.parametrize('accumulate,solver', [('normal', 'inverse'), ('concat', 'inverse'),
                                               ('normal', 'lstsq'), ('concat', 'lstsq')])
def test_non_finite_data_of_one_block_gives_it_zeros(accumulate, solver, where, monkeypatch, caplog):
    """A NaN in block 1's features X (injected after its block passes: a NaN through the quantized
    model itself is not what is tested here) or in its targets Y: no solver, the float64 fallback
    included, has a finite fit (and gelsd is never handed a NaN), so block 1 alone gets zeros,
    'zero' recorded, one warning; block 2 is fitted on block 1's plain quantized output and the
    model output stays finite and compensated."""
    q = _quantized('vit')
    from quant import qwt as algorithm
    real, seen, hit = algorithm.switch_pair, [], []

    def switch_pair(block):
        real_pair = real(block)

        def pair(x):
            first_call = block not in seen
            if first_call:
                seen.append(block)
            fp, out = real_pair(x)
            if first_call and len(seen) == 2:  # block 1's first batch: one element
                (x if where == 'features' else fp)[0, 2, 3] = float('nan')
                hit.append(x)
            return fp, out
        return pair
    monkeypatch.setattr(algorithm, 'switch_pair', switch_pair)
    model = copy.deepcopy(q['model'])
    stats = []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(model, q['images'], batch_size=8, solver=solver, accumulate=accumulate, stats=stats)
    assert len(seen) == 3 and len(hit) == 1
    assert [s['fallback'] for s in stats] == [None, 'zero', None]
    assert [s['used'] for s in stats] == [True, False, True] and stats[1]['r2'] is None
    comps = compensated_blocks(model)
    assert not comps[1].comp_weight.any() and not comps[1].comp_bias.any()
    assert comps[0].comp_weight.any() and comps[2].comp_weight.any()
    assert all(torch.isfinite(c.comp_weight).all() and torch.isfinite(c.comp_bias).all() for c in comps)

    warnings = _qwt_warnings(caplog)
    assert len(warnings) == 1 and '\n' not in warnings[0]
    msg = warnings[0]
    primary = 'non-finite solution' if (where == 'targets' and solver == 'inverse') else 'non-finite matrix'
    assert msg.startswith(f'QwT block 1: {qwt_module.REASONS[primary]} (')
    assert 'the block gets zero compensation' in msg and '--qwt_samples' in msg
    if solver == 'inverse':
        assert 'float64 least squares: the least-squares system holds inf or NaN' in msg
        assert '--qwt_solver lstsq' in msg
    else:  # the float64 solver is what failed: no second try, no hint to use it
        assert 'float64 least squares' not in msg and '--qwt_solver' not in msg

    # block 2 was fitted on block 1's plain quantized output (as in the r² <= 0 case)
    with torch.no_grad():
        set_quant_state(model, True, True)
        x = comps[0].forward_fp32(models.stem(model, q['images']))
        _, x = _fp_q(comps[1].block, x)
        fp, qo = _fp_q(comps[2].block, x)
        w_ref, _ = fit_concat(x.reshape(-1, 48), (fp - qo).reshape(-1, 48), 'lstsq')
        out = model(q['eval_images'])
    torch.testing.assert_close(comps[2].comp_weight, w_ref, rtol=0, atol=1e-4 * float(w_ref.abs().max()))
    assert torch.isfinite(out).all() and not torch.equal(out, q['repq_out'])


def test_fallback_before_start_block_still_gives_zeros(monkeypatch, caplog):
    """concat fits blocks before --start_block too (for their r²): a failed solve there falls back
    and is recorded, but the block keeps zero compensation."""
    q = _quantized('vit')
    _fail_block(monkeypatch, 'concat', 'singular', block=0)
    model = copy.deepcopy(q['model'])
    stats = []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(model, q['images'], start_block=1, batch_size=8, stats=stats)
    assert [s['fallback'] for s in stats] == ['lstsq', None, None]
    assert [s['used'] for s in stats] == [False, True, True] and stats[0]['r2'] > 0
    assert not compensated_blocks(model)[0].comp_weight.any()
    assert len(_qwt_warnings(caplog)) == 1


def test_qwt_switches_quantization_on_and_evaluation_mode():
    """Handed a model with quantization off and in training mode, qwt_compensate fits the quantized
    model in eval mode: the same W, b as from the model repq_vit returns."""
    q = _quantized('vit')
    model = q['model']
    set_quant_state(model, False, False)
    model.train()
    qwt_compensate(model, q['images'], batch_size=8)
    assert not any(m.training for m in model.modules())
    ref = _compensated('vit')['model']
    for a, b in zip(compensated_blocks(model), compensated_blocks(ref), strict=True):
        assert torch.equal(a.comp_weight, b.comp_weight) and torch.equal(a.comp_bias, b.comp_bias)


def test_used_means_any_non_zero_weight_and_every_fit_is_logged(monkeypatch, caplog):
    """A W with a zero entry is still used; one INFO line per fitted block gives r², the rms residual
    and whether the block is compensated (concat fits blocks before --start_block too)."""
    import re
    q = _quantized('vit')
    real = qwt_module.fit_concat

    def with_a_zero(x, y, solver):
        w, b = real(x, y, solver)
        w[0, 0] = 0
        return w, b
    monkeypatch.setattr(qwt_module, 'fit_concat', with_a_zero)
    stats = []
    with caplog.at_level('INFO', logger='quant.qwt'):
        qwt_compensate(q['model'], q['images'], start_block=1, batch_size=8, stats=stats)
    assert [s['used'] for s in stats] == [False, True, True]
    infos = [r.getMessage() for r in caplog.records if r.name == 'quant.qwt' and r.levelname == 'INFO']
    assert len(infos) == 3
    for i, (message, st) in enumerate(zip(infos, stats)):
        found = re.fullmatch(r'QwT block (\d): r2 (0\.\d{4}), rms residual \d+\.\d{6}, (compensated|zero compensation)',
                             message)
        assert found, message
        assert int(found.group(1)) == i and float(found.group(2)) == pytest.approx(st['r2'], abs=1e-4)
        assert found.group(3) == ('compensated' if st['used'] else 'zero compensation')


def test_rank_and_condition_by_hand():
    from quant.regression import rank_and_condition
    assert rank_and_condition(torch.diag(torch.tensor([4.0, 1.0, 0.0]))) == (2, float('inf'))
    assert rank_and_condition(torch.diag(torch.tensor([100.0, 1.0]))) == (2, 100.0)
    # eigenvalues 1 and 1e-13: below (1e-6)^2 of the largest, so one direction is rounding noise
    assert rank_and_condition(torch.diag(torch.tensor([1.0, 1e-13], dtype=torch.float64)))[0] == 1
    assert rank_and_condition(torch.diag(torch.tensor([1.0, 1e-11], dtype=torch.float64)))[0] == 2
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # second column = 2 x the first
    x1 = torch.cat([x, torch.ones(3, 1)], 1)
    assert rank_and_condition(x1.t() @ x1)[0] == 2


def _quantized_tiny_swin():
    m = make_tiny_swin()
    g = torch.Generator().manual_seed(0)
    quant.repq_vit(m, torch.randn(8, 3, 32, 32, generator=g), 4, 4)
    return m, torch.randn(32, 3, 32, 32, generator=g)


def test_a_singular_first_stage_is_one_warning_and_is_recorded(caplog):
    """The tiny Swin's first stage is rank-deficient by construction: a LayerNorm of a linear map of 2x2x3 =
    12 pixel values into 24 channels, so [X,1] has rank at most 12 + 1 (LayerNorm's scale) + 1 (ones) = 14 of
    25. The published float32 inverse then fits worse than nothing; the block is left out, and said so."""
    m, images = _quantized_tiny_swin()
    stats = []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(m, images, batch_size=8, stats=stats)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1
    assert warnings[0].startswith('QwT block 0: the float32 inverse of [X,1]^T[X,1] is numerically singular '
                                  '(rank 14 of 25, condition ')
    assert warnings[0].endswith(f"and its fit has r2 {stats[0]['r2']:.4g}, so the published procedure leaves this "
                                'block uncompensated; --qwt_solver lstsq fits it')
    assert stats[0]['r2'] < -1 and not stats[0]['used'] and stats[0]['singular']
    assert (stats[0]['rank'], stats[0]['unknowns']) == (14, 25) and stats[0]['condition'] > 2 ** 23
    assert [s['singular'] for s in stats[1:]] == [False] * 3 and all(s['used'] for s in stats[1:])
    assert 'rank' not in stats[1]

    m, images = _quantized_tiny_swin()
    stats, caplog.records[:] = [], []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(m, images, batch_size=8, stats=stats, solver='lstsq')
    assert [r for r in caplog.records if r.levelname == 'WARNING'] == []
    assert stats[0]['used'] and stats[0]['r2'] > 0.2 and not stats[0]['singular']


def test_end_of_run_counts_the_blocks_left_out():
    from utils.run.pipeline import qwt_block_lines
    blocks = [{'block': 0, 'used': False, 'singular': True}, {'block': 1, 'used': True},
              {'block': 2, 'used': False, 'singular': False}, {'block': 3, 'used': True}]
    assert qwt_block_lines(blocks) == ['QwT: 2 of 4 blocks compensated, 2 left out (1 for a numerically singular '
                                       'fit: block 0; --qwt_solver lstsq fits them)']
    assert qwt_block_lines(blocks[1:2]) == ['QwT: 1 of 1 blocks compensated, 0 left out']
    assert qwt_block_lines([]) == []
    # an fp16 overflow names what the run's kind can try: the float64 solver only where it is not in use already,
    # nothing about solvers for the group convolution (None)
    overflow = [{'block': 0, 'used': False, 'singular': False, 'fp16_overflow': True}]
    line = 'QwT: 0 of 1 blocks compensated, 1 left out (1 whose fit overflows half precision: block 0; {})'
    assert qwt_block_lines(overflow) == [line.format('--qwt_solver lstsq or more --qwt_samples')]
    assert qwt_block_lines(overflow, 'lstsq') == qwt_block_lines(overflow, None) == [line.format('more --qwt_samples')]


@pytest.mark.parametrize('condition,r2,flagged', [(2.0 ** 23, 0.0, True), (2.0 ** 23 - 1, 0.0, False),
                                                  (10.0, -0.0101, True), (10.0, -0.0099, False)])
def test_a_fit_is_called_singular_at_the_float32_limit_or_far_below_zero(monkeypatch, condition, r2, flagged):
    """Condition number at least 2^23 (1 / float32's epsilon), or r2 below -0.01: the published inverse's
    fit is rounding, not data."""
    from quant import qwt_linear as qwt_module
    monkeypatch.setattr(qwt_module, 'rank_and_condition', lambda gram: (3, condition))
    xs = [torch.randn(2, 5, 4)]
    assert qwt_module.broken_fit(xs, r2) == ((3, 5, condition) if flagged else None)


def _overflow_case(y_scale):
    """X ~ 0.01 N(0, 1), Y = y_scale x noise: the least-squares W is of order y_scale / 0.01 x (a noise fit's
    coefficients, ~0.1), with r² > 0 (any in-sample fit of noise explains a little)."""
    xs, noise = _gate_case(seed=3)
    return [0.01 * x for x in xs], y_scale * noise


@pytest.mark.parametrize('accumulate', ['normal', 'concat'])
@pytest.mark.parametrize('solver', ['inverse', 'lstsq'])
def test_a_fit_beyond_half_precision_is_left_out(accumulate, solver):
    """Hazard: a huge fit that is still 'used' (r² > 0) overflows W.half() to inf at inference and turns
    the logits to NaN. Such a block gets zeros and the plain quantized output; the float64 reference shows
    the fit really exceeds fp16's 65504 and really has r² > 0. At a tenth of that scale it is kept."""
    xs, y = _overflow_case(1e4)
    w_ref, b_ref, r2_ref, _ = _lstsq_reference(xs, y.repeat(2, 1, 1))
    assert float(w_ref.abs().max()) > 65504 and r2_ref > 0
    fit = _fit(accumulate, _OffsetBlock(y), xs, solver)
    assert fit.r2 > 0 and fit.fp16_overflow == pytest.approx(float(w_ref.abs().max()), rel=1e-2)
    assert not fit.weight.any() and not fit.bias.any()
    assert all(torch.equal(out, 2 * x - y) for x, out in zip(xs, fit.outs))
    xs, y = _overflow_case(1e3)
    w_ref, _, _, _ = _lstsq_reference(xs, y.repeat(2, 1, 1))
    assert float(w_ref.abs().max()) < 65504
    kept = _fit(accumulate, _OffsetBlock(y), xs, solver)
    assert kept.fp16_overflow is None and kept.weight.any()


def test_fp16_overflow_by_hand():
    from quant.qwt import fp16_overflow
    w, b = torch.zeros(2, 2), torch.zeros(2)
    assert fp16_overflow(w, b) is None
    w[1, 0] = 65504.0  # the largest finite half
    assert fp16_overflow(w, b) is None
    w[1, 0] = 65520.0  # rounds to inf in half precision
    assert fp16_overflow(w, b) == 65520.0
    w[1, 0] = -1.0
    b[1] = -70000.0  # the bias too: the fp16 check covers W and b alike
    assert fp16_overflow(w, b) == 70000.0


def test_an_overflowing_block_is_one_warning_and_recorded(monkeypatch, caplog):
    """Through qwt_compensate: block 1's fit scaled beyond fp16 (its r² kept positive) is one WARNING naming the block and
    --qwt_solver lstsq; stats say fp16_overflow and used False; the model's logits stay finite."""
    from quant import qwt_linear as qwt_module
    q = _quantized('vit')
    real, calls = qwt_module.fit_concat, []

    def huge(x, y, solver='inverse'):
        calls.append(1)
        w, b = real(x, y, solver)
        return (w * 1e9, b) if len(calls) == 2 else (w, b)
    real_r2 = qwt_module.r2_score
    monkeypatch.setattr(qwt_module, 'fit_concat', huge)
    monkeypatch.setattr(qwt_module, 'r2_score', lambda y, p: torch.tensor(0.5) if len(calls) == 2 else real_r2(y, p))
    model, stats = copy.deepcopy(q['model']), []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        qwt_compensate(model, q['images'], batch_size=8, stats=stats)
    assert [s['fp16_overflow'] for s in stats] == [False, True, False]
    assert [s['used'] for s in stats] == [True, False, True]
    warnings = _qwt_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith('QwT block 1: ') and '--qwt_solver lstsq' in warnings[0]
    assert 'beyond half precision (65504)' in warnings[0]
    with torch.no_grad():
        assert torch.isfinite(model(q['eval_images'])).all()
    from utils.run.pipeline import qwt_block_lines
    assert qwt_block_lines(stats) == ['QwT: 2 of 3 blocks compensated, 1 left out (1 whose fit overflows half '
                                      'precision: block 1; --qwt_solver lstsq or more --qwt_samples)']
