"""RepQ-ViT fake quantizers (SPEC §2) against hand-computed values."""
import math

import numpy as np
import pytest
import torch

import quant.quantizers as qz
import reference
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


def test_errors_of_1e10_and_above_are_never_chosen():
    """The published search starts from a best score of 1e10: a candidate must score below it.
    x = [0, 1, 2, 3, 10] scores 0.570917 (hand value above); times 1e5 it scores 5.70917e9 < 1e10 and
    calibrates, times 1.5e5 it scores 1.2846e10 and no candidate qualifies."""
    x = t([0.0, 1.0, 2.0, 3.0, 10.0])
    delta, zp = search_uniform(x * 1e5, 2)
    assert delta.item() == pytest.approx(9.968e5 / 3, rel=1e-6) and zp.item() == 0.0
    with pytest.raises(ValueError, match='calibration failed'):
        search_uniform(x * 1.5e5, 2)
    with pytest.raises(ValueError, match='calibration failed for channels \\[1\\]'):
        search_uniform_rows(torch.stack([x * 1e5, x * 1.5e5]), 2)
    # log-sqrt2, x = [0.85, 1] * s: every candidate delta is ~s, 0.85 s rounds up to level 0 (= delta),
    # mean error ~0.15^2 s^2 / 2: 2.81e9 for s = 5e5, 4.49e10 for s = 2e6
    for fast in (True, False):
        assert search_log_sqrt2(t([0.85, 1.0]) * 5e5, 4, fast=fast).item() > 0
        with pytest.raises(ValueError, match='calibration failed'):
            search_log_sqrt2(t([0.85, 1.0]) * 2e6, 4, fast=fast)


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


def test_quantile_below_limit_interpolates_at_float32_p_hand_values():
    """1000 zeros then a one: the rank is p * 1000 with p rounded to float32 first, as torch.quantile
    does. float32(0.999) = 0.999000012874603271484375: rank 999.000012874603271484375, value
    1.2874603271484375e-05 (numpy's float64 p gives rank 998.9999999999999 and 0). float32(0.9999) =
    0.99989998340606689453125: value 0.89998340606689453125. 1 - 0.9999 = 9.999999999998899e-05,
    float32 0.0000999999974737875163555145263671875: over [-1, 0, ..., 0] the value is
    -1 + 0.0999999974737875163555145263671875."""
    x = torch.zeros(1001)
    x[-1] = 1.0
    assert quantile(x, 0.999).item() == np.float32(1.2874603271484375e-05)
    assert quantile(x, 0.9999).item() == np.float32(0.89998340606689453125)
    x[-1], x[0] = 0.0, -1.0
    assert quantile(x, 1 - 0.9999).item() == np.float32(-1 + 0.0999999974737875163555145263671875)
    assert quantile(torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]), 0.5).item() == 2.0
    assert quantile(torch.tensor([[0.0, 10.0]]), 0.25).item() == 2.5


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
    # as many rows per call as fit under the limit: 1 row of 30 (2 would be 60), 50 rows of 1
    for shape, expected in (((3, 30), [30, 30, 30]), ((60, 1), [50, 10])):
        calls.clear()
        quantile_rows(torch.randn(*shape, generator=g), 0.999)
        assert calls == expected
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


# --------------------------------------------------------------------------- the real 2^24 limit

@pytest.fixture(scope='module')
def real_size():
    """2^24 + 1 values (above the published numpy fallback's limit) and their first 2^24 (at it), with
    both interpolation rules from tests/reference.py. Upper tails of a normal sample: the rules differ
    by several float32 steps there (float32(p) moves the rank by ~0.2)."""
    x = torch.randn(2 ** 24 + 1, generator=torch.Generator().manual_seed(0))
    ps = [q for p in qz.PERCENTILES for q in (p, 1.0 - p)]
    refs = {n: reference.quantiles_by_rule(x[:n].numpy(), ps) for n in (2 ** 24 + 1, 2 ** 24)}
    return x, ps, refs


def _ulp(v):
    return float(np.spacing(np.float32(abs(v))))


def _assert_rule(got, n, ps, refs, rule):
    """Each value is the ``rule`` quantile to one float32 step, and clearly not the other rule's."""
    other = 'torch' if rule == 'numpy' else 'numpy'
    for p, g, want, alt in zip(ps, got, refs[n][rule], refs[n][other]):
        assert abs(float(g) - want) <= _ulp(want), (n, p, float(g), want)
        if p > 0.5:
            assert abs(alt - want) > 3 * _ulp(want), 'the data cannot tell the rules apart'


def test_quantile_limit_is_2_pow_24():
    assert qz.QUANTILE_TORCH_LIMIT == 16777216


def test_quantile_switches_to_numpy_above_the_real_limit(real_size):
    x, ps, refs = real_size
    for n, rule in ((2 ** 24 + 1, 'numpy'), (2 ** 24, 'torch')):
        got = quantile(x[:n], ps[0])
        assert got.dtype == torch.float32 and got.dim() == 0
        _assert_rule([got], n, ps[:1], refs, rule)
        _assert_rule(list(quantile_rows(x[None, :n], ps[0])), n, ps[:1], refs, rule)


def test_layerwise_search_quantiles_at_the_real_limit(real_size):
    """What search_uniform and search_log_sqrt2 use: numpy's rule above 2^24 values, torch's at 2^24."""
    x, ps, refs = real_size
    _assert_rule(qz.quantiles(x, ps), 2 ** 24 + 1, ps, refs, 'numpy')
    _assert_rule(qz.quantiles(x[:-1], ps), 2 ** 24, ps, refs, 'torch')


def test_channelwise_ranges_at_the_real_limit(real_size):
    """What search_uniform_rows uses, for one channel of 2^24 + 1 and of 2^24 values."""
    x, ps, refs = real_size
    for n, rule in ((2 ** 24 + 1, 'numpy'), (2 ** 24, 'torch')):
        ranges = qz.candidate_ranges(x[None, :n])
        _assert_rule([v[0] for pair in ranges for v in pair], n, ps, refs, rule)


# --------------------------------------------------------------------------- searches against float64

@pytest.mark.parametrize('shape,bits,winner', [((2, 3, 197, 197), 4, 2), ((8, 3, 17, 17), 4, 1),
                                               ((8, 3, 17, 17), 3, 0), ((2, 3, 197, 197), 6, 2)])
def test_log_sqrt2_search_matches_float64_reference(shape, bits, winner):
    """Post-softmax maps (softmax of randn over the last dim): each of the three candidates wins
    somewhere, 0.99999 on ViT-sized maps at 4 bits; the library picks the reference's delta."""
    x = torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), dim=-1)
    choice = reference.log_sqrt2_search(x.numpy(), bits)
    assert (choice.index, choice.ambiguous) == (winner, False)
    for fast in (True, False):
        assert search_log_sqrt2(x, bits, fast=fast).item() == pytest.approx(choice.delta, rel=1e-6)


@pytest.mark.parametrize('n_bits,winner', [(3, 0), (4, 1), (6, 1), (8, 2)])
def test_uniform_searches_match_float64_reference(n_bits, winner):
    """Layer-wise and channel-wise search against the reference on activation-like [B, N, C] data:
    heavy-tailed channels and uniform ones, so that every candidate wins somewhere."""
    g = torch.Generator().manual_seed(10 + n_bits)
    x = torch.randn(6, 50, 12, generator=g) ** 3 * torch.linspace(0.1, 4, 12) + torch.linspace(-1, 1, 12)
    x[:, :, 6:] = torch.rand(6, 50, 6, generator=g) * torch.linspace(1, 3, 6) - 0.5
    choice = reference.uniform_search(x.numpy(), n_bits)
    assert choice.index == winner
    delta, zp = search_uniform(x, n_bits)
    assert not choice.ambiguous
    assert delta.item() == pytest.approx(choice.delta, rel=1e-6) and zp.item() == choice.zero_point
    deltas, zps = search_uniform_channelwise(x, n_bits)
    winners = set()
    for c in range(12):
        ch = reference.uniform_search(x[:, :, c].numpy(), n_bits)
        winners.add(ch.index)
        if not ch.ambiguous:
            assert deltas[0, 0, c].item() == pytest.approx(ch.delta, rel=1e-6), c
            assert zps[0, 0, c].item() == ch.zero_point, c
    assert len(winners) >= 2  # the data exercises more than one candidate


# --------------------------------------------------------------------------- the fast quantile path

def test_fast_quantile_path_is_used_on_this_torch(monkeypatch):
    """The self-check passes on this torch, and the searches then never call torch.quantile."""
    monkeypatch.setattr(qz, '_MATCHES_TORCH', {})
    assert qz.quantiles_match_torch(torch.device('cpu')) is True
    assert qz._MATCHES_TORCH == {'cpu': True}

    def refuse(*args, **kwargs):
        raise AssertionError('torch.quantile called: the fast path was not used')
    monkeypatch.setattr(torch, 'quantile', refuse)
    monkeypatch.setattr(qz, 'quantile_rows', refuse)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, 8, generator=g)
    search_uniform(x, 4)
    search_uniform_channelwise(x, 4)
    search_log_sqrt2(torch.softmax(x, -1), 4)
    UniformQuantizer(4, channel_wise=True)(x)
    UniformQuantizer(4)(x)
    LogSqrt2Quantizer(4)(torch.softmax(x, -1))


def test_fast_quantile_mismatch_warns_once_and_keeps_published_values(monkeypatch, caplog):
    """Where the fast path would not reproduce torch.quantile, torch.quantile is used (same values,
    slower) and one warning says so, however many searches run."""
    monkeypatch.setattr(qz, '_MATCHES_TORCH', {})
    real = qz.quantiles_rows_fast
    monkeypatch.setattr(qz, 'quantiles_rows_fast', lambda x2d, ps: [v + 1e-3 for v in real(x2d, ps)])
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 40, generator=g)
    with caplog.at_level('WARNING', logger='quant.quantizers'):
        d1, z1 = search_uniform_channelwise(w, 4)
        d2, _ = search_uniform_channelwise(w * 2, 4)
        delta = search_uniform(w, 4)[0]
    messages = [r.getMessage() for r in caplog.records if r.name == 'quant.quantizers']
    assert len(messages) == 1 and 'uses torch.quantile instead (same values, slower)' in messages[0]
    assert qz._MATCHES_TORCH == {'cpu': False}
    d_ref, z_ref = search_uniform_channelwise(w, 4, per_channel_loop=True)
    assert torch.equal(d1, d_ref) and torch.equal(z1, z_ref)
    assert torch.equal(delta, search_uniform(w, 4, fast=False)[0])


# --------------------------------------------------------------------------- state dict

def test_loading_a_state_refreshes_the_integer_zero_point_shortcut(monkeypatch):
    """load_state_dict copies in place, into the tensor the shortcut decision was cached for: a
    fractional zero point loaded there must bring back the published form."""
    q = UniformQuantizer(4)
    x = torch.linspace(-1, 2, 101)
    q(x)
    assert q.zero_point.item() == round(q.zero_point.item())
    calls = []
    real = qz.uniform_fake_quant_integer_zp
    monkeypatch.setattr(qz, 'uniform_fake_quant_integer_zp', lambda *a, **k: calls.append(1) or real(*a, **k))
    q(x)
    assert calls == [1]
    zp_tensor = q.zero_point
    state = q.state_dict()
    state['zero_point'] = torch.tensor(2.5)
    q.load_state_dict(state)
    assert q.zero_point is zp_tensor and q.zero_point.item() == 2.5  # same tensor, new value
    q(x)
    assert calls == [1]


def test_state_of_uncalibrated_quantizer_resets_a_calibrated_one():
    fresh = UniformQuantizer(4, channel_wise=True).state_dict()
    assert set(fresh) == {'inited', 'channel_wise'}
    q = UniformQuantizer(4, channel_wise=True)
    q(torch.randn(5, 7))
    q.load_state_dict(fresh)
    assert q.delta is None and q.zero_point is None and q.inited is False and q.channel_wise is True
    log_q = LogSqrt2Quantizer(4)
    log_q(torch.softmax(torch.randn(3, 9), -1))
    state = log_q.state_dict()
    assert set(state) == {'delta', 'inited'} and state['inited'].item() is True
    other = LogSqrt2Quantizer(4)
    other.load_state_dict(state, assign=True)
    assert other.inited is True and torch.equal(other.delta, log_q.delta)


def test_flags_are_python_bools_backed_by_buffers():
    """The forward pass reads a Python bool (a GPU buffer would synchronise); the buffer follows it."""
    q = UniformQuantizer(4, channel_wise=True)
    assert q.inited is False and q.channel_wise is True
    q.channel_wise = False
    q.inited = True
    assert q.channel_wise is False and q.inited is True
    assert dict(q.named_buffers())['channel_wise'].item() is False
    assert dict(q.named_buffers())['inited'].item() is True


@pytest.mark.parametrize('length', [1, 2, 7, 1001])
def test_fast_quantiles_for_any_p_equal_torch(length):
    """quantiles_rows_fast for arbitrary p (the median and both sides of it too), several rows."""
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(length)) ** 3
    ps = [0.999, 0.7, 0.5, 0.3, 0.001, 0.0, 1.0]
    for p, got in zip(ps, qz.quantiles_rows_fast(x, ps)):
        assert torch.equal(got, torch.quantile(x, p, dim=1)), p


def test_fast_quantiles_sort_only_the_tails(monkeypatch):
    """The work of the fast path, by hand for 1001 values: float32(0.999) * 1000 = 999.0000129 needs
    the top 1001 - 999 = 2 values; float32(0.001) * 1000 = 1.00000005 needs the bottom ceil + 1 = 3.
    One side asked for only: no top-k of the other side."""
    calls = []
    real = qz.topk_values
    monkeypatch.setattr(qz, 'topk_values', lambda x, k, largest: calls.append((k, largest)) or real(x, k, largest))
    x = torch.randn(2, 1001, generator=torch.Generator().manual_seed(3))
    qz.quantiles_rows_fast(x, [0.999, 1 - 0.999])
    assert calls == [(2, True), (3, False)]
    calls.clear()
    qz.quantiles_rows_fast(x, [0.999])
    assert calls == [(2, True)]
    calls.clear()
    qz.quantiles_rows_fast(x, [1 - 0.999])
    assert calls == [(3, False)]


def test_long_single_row_takes_the_subsample_path_and_several_rows_do_not(monkeypatch):
    """One row of 2^18 or more (a layer-wise search): the top-k runs on a superset found from a
    strided subsample; several rows: the plain top-k of each (the subsample is of row 0 only)."""
    calls = []
    real = qz.tail_superset
    monkeypatch.setattr(qz, 'tail_superset', lambda flat, k, largest: calls.append(flat.numel()) or
                        real(flat, k, largest))
    g = torch.Generator().manual_seed(4)
    one, two = torch.randn(1, 2 ** 18, generator=g), torch.randn(2, 2 ** 18, generator=g)
    assert torch.equal(qz.topk_values(one, 100, True), one.topk(100, dim=1).values)
    assert calls == [2 ** 18]
    assert torch.equal(qz.topk_values(two, 100, False), two.topk(100, dim=1, largest=False).values)
    assert torch.equal(qz.topk_values(one[:, :2 ** 18 - 1], 100, True), one[:, :2 ** 18 - 1].topk(100).values)
    assert torch.equal(qz.topk_values(one, 2 ** 12 + 1, True), one.topk(2 ** 12 + 1).values)  # k * 64 > n
    assert calls == [2 ** 18]
    assert torch.equal(qz.topk_values(one, 2 ** 12, True), one.topk(2 ** 12).values)  # k * 64 == n
    assert calls == [2 ** 18, 2 ** 18]


def test_integer_zero_point_decision_is_cached_per_zero_point(monkeypatch):
    """Whether the zero point is an integer is decided once per zero-point tensor (it needs a device
    read), not in every forward pass; a new zero point (reparameterisation) is decided again."""
    q = UniformQuantizer(4)
    x = torch.linspace(-1, 2, 101)
    q(x)
    calls = []
    real = torch.equal
    monkeypatch.setattr(torch, 'equal', lambda a, b: calls.append(1) or real(a, b))
    for _ in range(3):
        q(x)
    assert calls == []
    q.zero_point = q.zero_point + 0.5
    for _ in range(3):
        q(x)
    assert calls == [1]


def test_misleading_subsample_falls_back_to_the_plain_topk(monkeypatch):
    monkeypatch.setattr(qz, 'tail_superset', lambda flat, k, largest: None)
    row = torch.randn(1, 2 ** 18, generator=torch.Generator().manual_seed(5))
    assert torch.equal(qz.topk_values(row, 50, True), row.topk(50).values)


def test_published_mode_calls_torch_quantile_per_bound(monkeypatch):
    """fast=False is the published search, literally: one torch.quantile per candidate bound."""
    calls = []
    real = torch.quantile
    monkeypatch.setattr(torch, 'quantile', lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(300, generator=torch.Generator().manual_seed(6))
    search_uniform(x, 4, fast=False)
    assert len(calls) == 6
    search_log_sqrt2(torch.softmax(x, 0), 4, fast=False)
    assert len(calls) == 9
    search_uniform_channelwise(x.reshape(3, 100), 4, per_channel_loop=True)  # one search per channel
    assert len(calls) == 9 + 3 * 6
    q = UniformQuantizer(4)
    q.per_channel_loop = True
    q(x)
    assert len(calls) == 9 + 3 * 6 + 6
    log_q = LogSqrt2Quantizer(4)
    log_q.published_search = True
    log_q(torch.softmax(x, 0))
    assert len(calls) == 9 + 3 * 6 + 6 + 3


def test_log_sqrt2_published_search_tie_keeps_earliest_percentile(monkeypatch):
    x = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3, dim=0)
    monkeypatch.setattr(qz, 'log_sqrt2_fake_quant_reference', lambda x, d, n: torch.zeros_like(x * d))
    assert torch.equal(search_log_sqrt2(x, 4, fast=False), quantile(x, 0.999))


def test_log_sqrt2_on_a_strided_view_equals_reference():
    """k^T-like transposed maps: the table lookup must not assume a contiguous result."""
    x = torch.softmax(torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(8)), -1).transpose(-2, -1)
    assert not x.is_contiguous()
    delta = quantile(x, 0.9999)
    assert torch.equal(log_sqrt2_fake_quant(x, delta, 4), log_sqrt2_fake_quant_reference(x, delta, 4))


def test_failed_channels_are_listed_up_to_five():
    w = torch.randn(8, 6)
    w[1:8] = 0.5  # seven constant channels
    with pytest.raises(ValueError, match=r'calibration failed for channels \[1, 2, 3, 4, 5\]: '):
        search_uniform_rows(w, 4)
