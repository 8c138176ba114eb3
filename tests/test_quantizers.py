"""RepQ-ViT fake quantizers (SPEC §2) against hand-computed values."""
import math

import numpy as np
import pytest
import torch

import quant.quantizers as qz
from quant.quantizers import (LogSqrt2Quantizer, UniformQuantizer, log_sqrt2_fake_quant,
                              log_sqrt2_fake_quant_reference, quantile, quantile_rows, search_log_sqrt2,
                              search_uniform, search_uniform_channelwise, search_uniform_rows,
                              uniform_candidate, uniform_fake_quant)

SQRT2 = math.sqrt(2.0)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def approx_list(values, rel=1e-5, abs=1e-6):
    return pytest.approx(values, rel=rel, abs=abs)


# --------------------------------------------------------------------------- uniform_fake_quant

def test_uniform_fake_quant_hand_values_round_half_even_and_clamp():
    # delta 0.5, zp 2, 2 bits (levels 0..3):
    #   x/delta      = [-3, -2,  0, 0.5, 0.52, 1.5, 2.48, 10]
    #   round        = [-3, -2,  0,   0,    1,   2,    2, 10]   (half to even: 0.5 -> 0, 1.5 -> 2)
    #   + zp, clamp  = [ 0,  0,  2,   2,    3,   3,    3,  3]   (-1 -> 0, 4 -> 3, 12 -> 3)
    #   (q-zp)*delta = [-1, -1,  0,   0,  0.5, 0.5,  0.5, 0.5]
    x = t([-1.5, -1.0, 0.0, 0.25, 0.26, 0.75, 1.24, 5.0])
    out = uniform_fake_quant(x, t(0.5), t(2.0), 2)
    assert out.tolist() == [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]


def test_uniform_fake_quant_clamps_at_zero_and_top_level_8bit():
    # delta 0.1, zp 0, 8 bits: levels 0..255 -> representable range [0, 25.5]
    x = t([-0.3, 0.0, 0.14, 0.16, 25.5, 100.0])
    out = uniform_fake_quant(x, t(0.1), t(0.0), 8)
    assert out.tolist() == approx_list([0.0, 0.0, 0.1, 0.2, 25.5, 25.5])
    # zp 255: everything positive clamps to 0, negatives keep their level
    out = uniform_fake_quant(t([-25.5, -1.0, 3.0]), t(0.1), t(255.0), 8)
    assert out.tolist() == approx_list([-25.5, -1.0, 0.0])


def test_uniform_fake_quant_broadcasts_per_channel_parameters():
    x = t([[0.2, 0.9, -0.4], [0.2, 0.9, -0.4]])
    delta = t([[0.5], [0.25]])
    zp = t([[0.0], [2.0]])
    out = uniform_fake_quant(x, delta, zp, 2)
    # row 0: round([0.4, 1.8, -0.8]) = [0, 2, -1] -> clamp [0, 2, 0] -> [0, 1.0, 0]
    # row 1: round([0.8, 3.6, -1.6]) + 2 = [3, 6, 0] -> clamp [3, 3, 0] -> (q-2)*0.25 = [0.25, 0.25, -0.5]
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.25, 0.25, -0.5]]


def test_uniform_candidate_hand_values():
    delta, zp = uniform_candidate(t(0.5), t(-2.5), 2)  # (0.5 + 2.5) / 3 = 1, zp = round(2.5) = 2 (half to even)
    assert delta.item() == 1.0 and zp.item() == 2.0
    delta, zp = uniform_candidate(t(12.0), t(-3.0), 4)  # 15 / 15 = 1, zp = 3
    assert delta.item() == 1.0 and zp.item() == 3.0
    delta, zp = uniform_candidate(t(1.0), t(0.5), 3)  # 0.5 / 7, zp = round(-7) = -7
    assert delta.item() == pytest.approx(0.5 / 7) and zp.item() == -7.0


# --------------------------------------------------------------------------- search_uniform

def test_search_uniform_hand_values_first_percentile_wins():
    # 5 sorted values, linear interpolation: rank = p * 4.
    #   p=0.999:   hi = 3 + 0.996*7 = 9.972,   lo = 0.004    -> delta = 9.968/3,   zp = round(-0.0012) = 0
    #   p=0.9999:  hi = 3 + 0.9996*7 = 9.9972, lo = 0.0004   -> delta = 9.9968/3
    #   p=0.99999: hi = 9.99972,               lo = 0.00004  -> delta = 9.99968/3
    # every candidate rounds x to levels [0, 0, 1, 1, 3]:
    #   mse(0.999)   = (1 + (2-3.32267)^2 + (3-3.32267)^2 + (10-9.968)^2) / 5   = 0.570917
    #   mse(0.9999)  = (1 + (2-3.33227)^2 + (3-3.33227)^2 + (10-9.9968)^2) / 5  = 0.577069
    #   mse(0.99999) = (1 + (2-3.33323)^2 + (3-3.33323)^2 + (10-9.99968)^2) / 5 = 0.577707
    x = t([0.0, 1.0, 2.0, 3.0, 10.0])
    assert quantile(x, 0.999).item() == pytest.approx(9.972, rel=1e-6)
    assert quantile(x, 1 - 0.999).item() == pytest.approx(0.004, rel=1e-4)
    assert quantile(x, 0.9999).item() == pytest.approx(9.9972, rel=1e-6)
    assert quantile(x, 1 - 0.99999).item() == pytest.approx(0.00004, rel=1e-3)
    delta, zp = search_uniform(x, 2)
    assert delta.dim() == 0 and zp.dim() == 0
    assert delta.item() == pytest.approx(9.968 / 3, rel=1e-6)
    assert zp.item() == 0.0
    d = 9.968 / 3
    expected = [0.0, 0.0, d, d, 3 * d]
    assert uniform_fake_quant(x, delta, zp, 2).tolist() == approx_list(expected)
    mse = sum((a - b) ** 2 for a, b in zip(x.tolist(), expected)) / 5
    assert mse == pytest.approx(0.570917, rel=1e-5)


def test_search_uniform_all_positive_data_nonzero_zero_point_last_percentile_wins():
    # x = [2, 3, 4, 5], rank = p * 3:
    #   p=0.999:   lo = 2.003,   hi = 4.997   -> delta = 0.998,   zp = round(-2.007) = -2, mse = 5.4e-5
    #   p=0.9999:  lo = 2.0003,  hi = 4.9997  -> delta = 0.9998,  zp = -2,                 mse = 5.4e-7
    #   p=0.99999: lo = 2.00003, hi = 4.99997 -> delta = 0.99998, zp = -2,                 mse = 5.4e-9 (wins)
    x = t([2.0, 3.0, 4.0, 5.0])
    delta, zp = search_uniform(x, 2)
    assert delta.item() == pytest.approx(0.99998, rel=1e-6)
    assert zp.item() == -2.0
    # levels: round(x / delta) = [2..5], + zp -> [0..3], no clamping; x_hat = [2..5] * delta
    assert uniform_fake_quant(x, delta, zp, 2).tolist() == approx_list([2 * 0.99998, 3 * 0.99998,
                                                                        4 * 0.99998, 5 * 0.99998], rel=1e-6)


def test_search_uniform_all_negative_data_zero_point_at_top():
    x = t([-5.0, -4.0, -3.0, -2.0])
    delta, zp = search_uniform(x, 2)
    # mirror image of the all-positive case: lo = -4.99997, hi = -2.00003, zp = round(4.99997 / 0.99998) = 5
    assert delta.item() == pytest.approx(0.99998, rel=1e-6)
    assert zp.item() == 5.0
    assert uniform_fake_quant(x, delta, zp, 2).tolist() == approx_list([-5 * 0.99998, -4 * 0.99998,
                                                                        -3 * 0.99998, -2 * 0.99998], rel=1e-6)


def _numpy_search(x, n_bits):
    """Independent float64 re-statement of the SPEC §2 rule, used on data with clear winners."""
    flat = x.reshape(-1).double().numpy()
    best, result = np.inf, None
    for p in (0.999, 0.9999, 0.99999):
        hi, lo = np.percentile(flat, p * 100), np.percentile(flat, (1 - p) * 100)
        delta = (hi - lo) / (2 ** n_bits - 1)
        zp = np.round(-lo / delta)
        xq = (np.clip(np.round(flat / delta) + zp, 0, 2 ** n_bits - 1) - zp) * delta
        score = np.mean((flat - xq) ** 2)
        if score < best:
            best, result = score, (p, delta, zp)
    return result


@pytest.mark.parametrize('n_bits', [3, 4, 6])
def test_search_uniform_matches_float64_restatement(n_bits):
    g = torch.Generator().manual_seed(n_bits)
    x = torch.randn(4000, generator=g) * 2 + 0.5
    x[:3] = t([30.0, -25.0, 40.0])  # outliers make the clipping choice matter
    p, delta_ref, zp_ref = _numpy_search(x, n_bits)
    delta, zp = search_uniform(x, n_bits)
    assert delta.item() == pytest.approx(delta_ref, rel=1e-4)
    assert zp.item() == zp_ref


def test_tie_keeps_earliest_percentile(monkeypatch):
    """All three candidates score the same: the first (0.999) must be kept (strictly smaller wins)."""
    x = t([0.0, 1.0, 2.0, 3.0, 10.0])
    expected = uniform_candidate(quantile(x, 0.999), quantile(x, 1 - 0.999), 2)
    others = [uniform_candidate(quantile(x, p), quantile(x, 1 - p), 2)[0] for p in (0.9999, 0.99999)]
    assert all(o.item() != expected[0].item() for o in others)  # the candidates are distinguishable
    # every candidate's fake quantization returns zeros -> every score is mean(x^2), a three-way tie
    monkeypatch.setattr(qz, 'uniform_sq_error', lambda x, d, z, n, out: x.pow(2).expand_as(out))
    delta, zp = search_uniform(x, 2)
    assert torch.equal(delta, expected[0]) and torch.equal(zp, expected[1])
    rows = torch.stack([x, x * 2])
    d_rows, z_rows = search_uniform_rows(rows, 2)
    assert d_rows[0].item() == expected[0].item()
    assert d_rows[1].item() == uniform_candidate(quantile(rows[1], 0.999), quantile(rows[1], 1 - 0.999), 2)[0].item()


def test_tie_between_later_candidates_keeps_the_earlier(monkeypatch):
    """Scores [s, t, t] with t < s: 0.9999 beats 0.999, and 0.99999 (a tie with it) must not replace it."""
    x = t([0.0, 1.0, 2.0, 3.0, 10.0])
    calls = []

    def fake(x, d, z, n, out):  # squared error of x_hat = 0, then twice of x_hat = 1
        calls.append(d)
        return x.pow(2) if len(calls) == 1 else (x - 1).pow(2)
    monkeypatch.setattr(qz, 'uniform_sq_error', fake)
    delta, _ = search_uniform(x, 2)
    assert len(calls) == 3
    assert torch.equal(delta, calls[1])
    assert not torch.equal(delta, calls[2])


def test_log_sqrt2_tie_keeps_earliest_percentile(monkeypatch):
    x = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3, dim=0)
    monkeypatch.setattr(qz, 'log_sqrt2_fake_quant', lambda x, d, n, out=None, index=None: torch.zeros_like(x * d))
    assert torch.equal(search_log_sqrt2(x, 4), quantile(x, 0.999))


def test_constant_tensor_calibration_raises_value_error():
    with pytest.raises(ValueError, match='calibration failed.*constant'):
        search_uniform(torch.full((10,), 3.0), 4)
    with pytest.raises(ValueError, match='calibration failed'):
        UniformQuantizer(4)(torch.zeros(2, 5))
    w = torch.randn(4, 6)
    w[2] = 0.5  # one constant output channel
    with pytest.raises(ValueError, match=r'calibration failed for channels \[2\]'):
        UniformQuantizer(4, channel_wise=True)(w)


def test_non_finite_input_raises_value_error():
    with pytest.raises(ValueError, match='calibration failed'):
        search_uniform(t([0.0, 1.0, float('nan'), 2.0]), 4)


def test_log_sqrt2_calibration_failure_on_zeros_raises_value_error():
    with pytest.raises(ValueError, match='calibration failed'):
        search_log_sqrt2(torch.zeros(10), 4)


# --------------------------------------------------------------------------- log-sqrt2

def test_log_sqrt2_hand_values_4bit():
    delta = t(1.0)
    # q = round(-2 log2(x)):  x=2 -> -2 -> clamp 0 -> delta;  x=1 -> 0;  x=1/sqrt2 -> 1;  x=0.6 -> round(1.47) = 1;
    # x=0.5 -> 2;  x=0.3 -> round(3.47) = 3;  x=2^-7.5 -> 15 (top level);  x=2^-8 -> 16 >= 16 -> 0;
    # x=0 -> max(0, 1e-6) -> round(39.86) = 40 -> 0
    x = t([2.0, 1.0, 1 / SQRT2, 0.6, 0.5, 0.3, 2 ** -7.5, 2 ** -8, 0.0])
    expected = [1.0, 1.0, 0.5 * SQRT2, 0.5 * SQRT2, 0.5, 0.25 * SQRT2, 2 ** -8 * SQRT2, 0.0, 0.0]
    ref = log_sqrt2_fake_quant_reference(x, delta, 4)
    assert ref.tolist() == approx_list(expected, rel=1e-6, abs=0)
    assert torch.equal(log_sqrt2_fake_quant(x, delta, 4), ref)
    assert qz.log_sqrt2_index(x, delta, 4).tolist() == [-2.0, 0.0, 1.0, 1.0, 2.0, 3.0, 15.0, 16.0, 40.0]


def test_log_sqrt2_hand_values_with_delta_and_6bit_zero():
    delta = t(0.5)
    # x/delta: 0.25 -> 2 -> 0.5*0.5;  0.125/0.5 = 2^-2 -> q=4 -> 2^-2 * 0.5;  0.9 > delta -> q<0 -> delta
    x = t([0.25, 0.125, 0.9])
    assert log_sqrt2_fake_quant(x, delta, 4).tolist() == approx_list([0.25, 0.125, 0.5], rel=1e-6, abs=0)
    # 6 bits: x = 0 gives q = 40 < 64, so it is *not* masked: 2^-20 * delta
    z = t([0.0])
    assert log_sqrt2_fake_quant_reference(z, delta, 6).item() == 2 ** -20 * 0.5
    assert log_sqrt2_fake_quant(z, delta, 6).item() == 2 ** -20 * 0.5
    # 5 bits: 40 >= 32 -> 0
    assert log_sqrt2_fake_quant(z, delta, 5).item() == 0.0
    # 3 bits: top level q=7 is 2^-4 * sqrt2 * delta, q=8 is masked
    x3 = t([2 ** -3.5 * 0.5, 2 ** -4 * 0.5])
    assert log_sqrt2_fake_quant(x3, delta, 3).tolist() == approx_list([2 ** -4 * SQRT2 * 0.5, 0.0], rel=1e-6, abs=0)


@pytest.mark.parametrize('n_bits', [3, 4, 5, 6, 7, 8])
def test_log_sqrt2_table_equals_reference_bit_for_bit(n_bits):
    g = torch.Generator().manual_seed(100 + n_bits)
    x = torch.softmax(torch.randn(2, 3, 17, 17, generator=g) * 4, dim=-1)
    x[0, 0, :, :3] = 0.0                      # exact zeros
    x[1, 2, 0, :5] = t([1e-7, 1e-6, 1e-30, 0.7, 1.0])
    for delta in (quantile(x, 0.999), quantile(x, 0.99999), t(0.05), t(1.0)):
        assert (x > delta).any() or delta.item() >= 1.0
        ref = log_sqrt2_fake_quant_reference(x, delta, n_bits)
        out = log_sqrt2_fake_quant(x, delta, n_bits)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out, ref)


# --------------------------------------------------------------------------- channel-wise

@pytest.mark.parametrize('shape', [(16, 20), (8, 3, 4, 4), (4, 10, 12)])
def test_channelwise_vectorised_equals_per_channel_loop(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.linspace(0.1, 3.0, shape[-1 if len(shape) == 3 else 0]).reshape(
        (1, 1, -1) if len(shape) == 3 else (-1,) + (1,) * (len(shape) - 1)) + 0.3
    for n_bits in (4, 6):
        d_vec, z_vec = search_uniform_channelwise(x, n_bits, per_channel_loop=False)
        d_loop, z_loop = search_uniform_channelwise(x, n_bits, per_channel_loop=True)
        expected_shape = (1, 1, shape[-1]) if len(shape) == 3 else (shape[0],) + (1,) * (len(shape) - 1)
        assert d_vec.shape == expected_shape and z_vec.shape == expected_shape
        assert d_loop.shape == expected_shape
        assert torch.equal(d_vec, d_loop) and torch.equal(z_vec, z_loop)
        # and against search_uniform on each channel done by hand
        for c in range(expected_shape[-1] if len(shape) == 3 else shape[0]):
            channel = x[:, :, c] if len(shape) == 3 else x[c]
            d, z = search_uniform(channel, n_bits)
            idx = (0, 0, c) if len(shape) == 3 else (c,) + (0,) * (len(shape) - 1)
            assert d_vec[idx].item() == d.item() and z_vec[idx].item() == z.item()


def test_channelwise_activation_statistics_over_batch_and_tokens():
    # channel 0 spans [0, 1] in sample 0 and [10, 11] in sample 1: its range must cover both samples
    x = torch.zeros(2, 5, 2)
    x[0, :, 0] = torch.linspace(0, 1, 5)
    x[1, :, 0] = torch.linspace(10, 11, 5)
    x[:, :, 1] = torch.linspace(-1, 1, 10).reshape(2, 5)
    d, z = search_uniform_channelwise(x, 8)
    d0, z0 = search_uniform(x[:, :, 0].reshape(-1), 8)
    assert d[0, 0, 0].item() == d0.item() and z[0, 0, 0].item() == z0.item()
    assert d[0, 0, 0].item() == pytest.approx(11.0 / 255, rel=1e-2)


def test_channelwise_quantizer_module_uses_channel_shapes():
    w = torch.randn(6, 5)
    q = UniformQuantizer(4, channel_wise=True)
    out = q(w)
    assert q.delta.shape == (6, 1) and q.zero_point.shape == (6, 1)
    assert torch.equal(out, uniform_fake_quant(w, q.delta, q.zero_point, 4))
    with pytest.raises(ValueError, match='5-D'):
        search_uniform_channelwise(torch.randn(2, 2, 2, 2, 2), 4)


# --------------------------------------------------------------------------- quantile fallback

def test_quantile_above_limit_uses_numpy_percentile(monkeypatch):
    monkeypatch.setattr(qz, 'QUANTILE_TORCH_LIMIT', 100)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, generator=g) ** 3  # 150 values > limit
    for p in (0.999, 0.9999, 0.99999, 1 - 0.999, 1 - 0.99999):
        expected = torch.tensor(np.percentile(x.reshape(-1).numpy(), p * 100), dtype=torch.float32)
        got = quantile(x, p)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert torch.equal(got, expected)
    # quantile_rows with rows longer than the limit: one numpy percentile per row
    rows = torch.randn(4, 120, generator=g)
    for p in (0.999, 1 - 0.999):
        expected = torch.stack([torch.tensor(np.percentile(r.numpy(), p * 100), dtype=torch.float32) for r in rows])
        assert torch.equal(quantile_rows(rows, p), expected)


def test_quantile_below_limit_is_torch_quantile():
    x = torch.randn(300)
    for p in (0.999, 0.0001):
        assert torch.equal(quantile(x, p), torch.quantile(x, p))


def test_quantile_rows_chunking_matches_per_row(monkeypatch):
    monkeypatch.setattr(qz, 'QUANTILE_TORCH_LIMIT', 50)  # rows of 20 -> chunks of 2 rows
    g = torch.Generator().manual_seed(4)
    x2d = torch.randn(7, 20, generator=g)
    calls = []
    real = torch.quantile

    def spy(inp, q, *args, **kwargs):
        calls.append(inp.numel())
        return real(inp, q, *args, **kwargs)
    monkeypatch.setattr(torch, 'quantile', spy)
    for p in (0.999, 0.9999, 1 - 0.99999):
        calls.clear()
        got = quantile_rows(x2d, p)
        assert got.shape == (7,)
        assert calls == [40, 40, 40, 20]  # ceil(7 / 2) calls, each at most the limit
        expected = torch.stack([real(row, p) for row in x2d])
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------- modules

def test_uniform_quantizer_initialises_on_first_call_only():
    q = UniformQuantizer(4)
    assert not q.inited and q.delta is None
    x1 = torch.linspace(-1, 1, 100)
    out1 = q(x1)
    assert q.inited
    d1, z1 = q.delta.clone(), q.zero_point.clone()
    assert (d1, z1) == search_uniform(x1, 4)
    x2 = torch.linspace(-10, 30, 100)
    out2 = q(x2)
    assert torch.equal(q.delta, d1) and torch.equal(q.zero_point, z1)
    assert torch.equal(out2, uniform_fake_quant(x2, d1, z1, 4))
    assert out2.max().item() <= out1.max().item() + 1e-6  # clipped to the first batch's range


def test_log_sqrt2_quantizer_initialises_on_first_call_only():
    q = LogSqrt2Quantizer(4)
    x1 = torch.softmax(torch.randn(4, 16), dim=-1)
    q(x1)
    assert q.inited
    d1 = q.delta.clone()
    assert torch.equal(d1, search_log_sqrt2(x1, 4))
    x2 = torch.softmax(torch.randn(4, 16) * 10, dim=-1)
    out2 = q(x2)
    assert torch.equal(q.delta, d1)
    assert torch.equal(out2, log_sqrt2_fake_quant(x2, d1, 4))


@pytest.mark.parametrize('bits', [0, 1, 9, 16, 32])
def test_bit_widths_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError, match=f'bit width {bits} not supported'):
        UniformQuantizer(bits)
    with pytest.raises(ValueError, match='2 to 8 bits'):
        LogSqrt2Quantizer(bits)


@pytest.mark.parametrize('bits', [2, 8])
def test_bit_widths_2_and_8_accepted(bits):
    assert UniformQuantizer(bits).n_bits == bits
    assert LogSqrt2Quantizer(bits).n_bits == bits


def test_fast_quantiles_equal_published_on_both_sides_of_the_numpy_limit(monkeypatch):
    """The fast path (tails by topk, or one numpy call above the limit) gives the published values."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)) ** 3
    ps = [q for p in qz.PERCENTILES for q in (p, 1.0 - p)]
    below = qz.quantiles(x, ps, fast=True)
    assert all(torch.equal(a, torch.quantile(x, p)) for a, p in zip(below, ps))
    monkeypatch.setattr(qz, 'QUANTILE_TORCH_LIMIT', 1000)
    above = qz.quantiles(x, ps, fast=True)
    for a, p in zip(above, ps):
        assert torch.equal(a, qz.quantile(x, p))
        assert a.item() == np.float32(np.percentile(x.numpy(), p * 100))


@pytest.mark.parametrize('n_bits', [2, 4, 6, 8])
def test_integer_zero_point_shortcut_equals_published_form(n_bits):
    """The two-passes-shorter form used for integer zero points gives equal values, saturation included."""
    from quant.quantizers import uniform_fake_quant_integer_zp
    g = torch.Generator().manual_seed(n_bits)
    for _ in range(20):
        x = torch.randn(500, generator=g) * 5 + float(torch.randn(1, generator=g))
        x[:6] = t([0.0, 1e30, -1e30, 3e7, -3e7, 0.5])
        delta = torch.rand((), generator=g) * 0.5 + 1e-3
        zp = torch.randint(-10, 2 ** n_bits + 10, (), generator=g).float()
        assert torch.equal(uniform_fake_quant_integer_zp(x, delta, zp, n_bits), uniform_fake_quant(x, delta, zp, n_bits))


def test_quantizer_uses_the_published_form_for_a_fractional_zero_point(monkeypatch):
    """After reparameterisation zp* is a mean, not an integer: the shortcut would be wrong there."""
    q = UniformQuantizer(4)
    q.delta, q.zero_point, q.inited = t(0.1), t(2.5), True
    x = torch.linspace(-1, 2, 101)
    assert torch.equal(q(x), uniform_fake_quant(x, t(0.1), t(2.5), 4))
    q.zero_point = t(3.0)
    calls = []
    monkeypatch.setattr(qz, 'uniform_fake_quant_integer_zp', lambda *a: calls.append(1) or uniform_fake_quant(*a))
    q(x)
    assert calls == [1]


@pytest.mark.parametrize('n_bits', [2, 4, 8])
def test_search_error_equals_published_squared_error_bit_for_bit(n_bits):
    """The search's two-passes-shorter squared error equals (x - fake_quant(x))^2 bit for bit, for the
    integer zero points candidates have, and keeps the published NaN / inf for non-finite ones."""
    g = torch.Generator().manual_seed(n_bits)
    x = torch.randn(3, 400, generator=g) * 4
    x[:, :4] = t([0.0, 1e30, -1e30, -0.0])
    delta = torch.rand(3, 1, generator=g) * 0.5 + 1e-3
    for zp in (torch.randint(-5, 2 ** n_bits + 5, (3, 1), generator=g).float(),
               t([[float('inf')], [float('nan')], [2.0]]), t([[-float('inf')], [0.0], [1.0]])):
        published = (x - uniform_fake_quant(x, delta, zp, n_bits)).abs().pow(2)
        fast = qz.uniform_sq_error(x, delta, zp, n_bits, torch.empty_like(x))
        torch.testing.assert_close(fast, published, rtol=0, atol=0, equal_nan=True)


def test_searches_on_strided_views_equal_published():
    """k^T and channels are strided views: the fast searches copy them once and must give the
    published parameters (the published code reads the view directly)."""
    g = torch.Generator().manual_seed(7)
    k = (torch.randn(2, 3, 40, 16, generator=g) * torch.linspace(0.2, 3, 16)).transpose(-2, -1)
    assert not k.is_contiguous()
    for n_bits in (3, 4):
        fast, published = search_uniform(k, n_bits), search_uniform(k, n_bits, fast=False)
        assert torch.equal(fast[0], published[0]) and torch.equal(fast[1], published[1])
    attn = torch.softmax(torch.randn(2, 3, 40, 40, generator=g) * 3, dim=-1).transpose(-2, -1)
    assert not attn.is_contiguous()
    assert torch.equal(search_log_sqrt2(attn, 4), search_log_sqrt2(attn, 4, fast=False))


def test_tail_superset_prime_stride_survives_outlier_channels():
    """Four outlier channels in 64, at multiples of 16: a stride of 16 samples only them and misses
    the tail (the full topk would then run); the prime stride does not, and the values are exact."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 ** 13, 64, generator=g)
    tokens[:, ::16] *= 10
    flat = tokens.reshape(-1)
    k = flat.numel() // 1000
    assert qz.tail_superset(flat, k, True, stride=16) is None
    for largest in (True, False):
        kept = qz.tail_superset(flat, k, largest)
        assert kept is not None and k <= kept.numel() <= 4 * k
        assert torch.equal(qz.topk_values(flat[None], k, largest), flat.topk(k, largest=largest).values[None])


def test_log_sqrt2_int32_index_buffer_equals_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.softmax(torch.randn(4, 50, 50, generator=g) * 4, dim=-1)
    delta = quantile(x, 0.9999)
    index = torch.empty(x.shape, dtype=torch.int32)
    out = log_sqrt2_fake_quant(x, delta, 4, out=torch.empty_like(x), index=index)
    assert torch.equal(out, log_sqrt2_fake_quant_reference(x, delta, 4))
    assert index.min().item() >= 0 and index.max().item() == 16  # masked values use the extra level
