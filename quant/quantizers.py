"""RepQ-ViT fake quantizers (SPEC §2): a uniform affine quantizer and the log-√2 quantizer.

The math lives in pure functions so tests can check it against hand-computed values; the two
``nn.Module`` classes only hold the calibrated parameters and initialise them on the first batch.
"""
import logging
import math

import numpy as np
import torch
from torch import nn

# Candidate clipping percentiles, tried in this order; a later one must be strictly better to win.
PERCENTILES = (0.999, 0.9999, 0.99999)
# Older torch.quantile refused inputs above 2**24 elements and the published code fell back to
# numpy.percentile there. numpy interpolates at p in float64; torch takes p in float32, which at that
# size moves the interpolation point by a fraction of a rank or more. Current torch accepts such inputs,
# so the fallback is reproduced explicitly: every torch version then gives the published values.
QUANTILE_TORCH_LIMIT = 2 ** 24
_INIT_SCORE = 1e10  # the published "best_score" start value
_logger = logging.getLogger(__name__)


def _check_bits(n_bits):
    if not 2 <= int(n_bits) <= 8:
        raise ValueError(f"bit width {n_bits} not supported: use 2 to 8 bits")


class _StraightThrough(torch.autograd.Function):
    """A rounding op whose gradient passes straight through; subclasses give the forward."""

    @staticmethod
    def backward(ctx, grad):
        return grad


class RoundSTE(_StraightThrough):
    """``torch.round`` forward; the gradient passes straight through (the published RoundSTE)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)


class CeilSTE(_StraightThrough):
    """``torch.ceil`` forward; the gradient passes straight through (the published CeilSTE)."""

    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)


class Log2STE(torch.autograd.Function):
    """``log2(max(x, 1e-6))`` forward; backward the derivative of log2 where x > 1e-6, 0 where the clamp
    held it (the published Log2STE)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.log2(torch.clamp(x, min=1e-6))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return torch.where(x <= 1e-6, torch.zeros_like(grad), grad / (x * math.log(2.0)))


class MaskSTE(torch.autograd.Function):
    """``x`` with the ``mask``ed entries set to 0; no gradient reaches them (the published MaskSTE)."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.masked_fill(mask, 0)

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return grad.masked_fill(mask, 0), None


def needs_ste(quantizer, x):
    """Whether the quantizer's input takes the straight-through graph: only where QwT* switched it on
    (``set_straight_through``) and a gradient must flow through ``x``. Every other call, gradient mode or
    not, runs the inference form, bit for bit as before (the published graph may give +0.0 where the
    inference form gives -0.0)."""
    return getattr(quantizer, 'straight_through', False) and x.requires_grad and torch.is_grad_enabled()


def set_straight_through(module, enabled):
    """Switch the straight-through graph of every fake quantizer under ``module`` (QwT* fine-tuning)."""
    for m in module.modules():
        if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            m.straight_through = bool(enabled)


def quantile(x, p):
    """The published quantile of all of ``x``: torch.quantile, or numpy.percentile above 2**24 values."""
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_TORCH_LIMIT:
        return torch.tensor(np.percentile(flat.cpu().numpy(), p * 100), device=x.device, dtype=torch.float32)
    return torch.quantile(flat, p)


def quantile_rows(x2d, p):
    """``quantile(row, p)`` for every row of a [rows, values] tensor (one torch.quantile per chunk)."""
    rows, length = x2d.shape
    if length > QUANTILE_TORCH_LIMIT:
        return torch.stack([quantile(row, p) for row in x2d])
    chunk = max(1, QUANTILE_TORCH_LIMIT // max(length, 1))  # keep each call under old torch's limit
    return torch.cat([torch.quantile(part, p, dim=1) for part in x2d.split(chunk)])


def _torch_rank(p, length):
    """torch.quantile's interpolation point for ``p`` over ``length`` sorted values (torch >= 2.1):
    the float32 ``p`` times the last index in float64 -> (index below, index above, float32 weight)."""
    rank = torch.tensor(p, dtype=torch.float32).double() * (length - 1)
    return int(rank.floor()), int(rank.ceil()), (rank - rank.floor()).float()


def quantiles_rows_fast(x2d, ps):
    """``[quantile_rows(x2d, p) for p in ps]`` from the order statistics alone.

    The clipping percentiles sit in the tails, so two ``topk`` calls (largest and smallest few
    values of every row) replace a full sort; torch.quantile's rank and ``lerp`` are reproduced,
    which ``quantiles_match_torch`` checks once per device.
    """
    length = x2d.shape[1]
    ranks = [_torch_rank(p, length) for p in ps]
    upper = [r for p, r in zip(ps, ranks) if p > 0.5]
    lower = [r for p, r in zip(ps, ranks) if p <= 0.5]
    k_hi = min(length, length - min((r[0] for r in upper), default=length))
    k_lo = min(length, max((r[1] for r in lower), default=-1) + 1)
    top = topk_values(x2d, k_hi, largest=True) if k_hi > 0 else None      # top[:, j] = sorted[:, -1 - j]
    bottom = topk_values(x2d, k_lo, largest=False) if k_lo > 0 else None  # bottom[:, j] = sorted[:, j]

    def sorted_at(i, upper_tail):
        return top[:, length - 1 - i] if upper_tail else bottom[:, i]

    out = []
    for p, (below, above, weight) in zip(ps, ranks):
        hi_tail = p > 0.5
        out.append(torch.lerp(sorted_at(below, hi_tail), sorted_at(above, hi_tail),
                              weight.to(device=x2d.device, dtype=x2d.dtype)))
    return out


def topk_values(x2d, k, largest):
    """``x2d.topk(k, dim=1, largest).values``, exactly, for a single long row in a few cheap passes."""
    rows, n = x2d.shape
    if rows == 1 and n >= 2 ** 18 and k * 64 <= n:
        kept = tail_superset(x2d[0], k, largest)
        if kept is not None:
            return kept.topk(k, largest=largest).values[None]
    return x2d.topk(k, dim=1, largest=largest).values


def tail_superset(flat, k, largest, stride=17):
    """The values of ``flat`` at or beyond a threshold taken from a strided subsample: a superset of
    its k extreme values (about 2k of them), or None when the subsample misleads (fewer than k).

    The stride is prime: a power of two would sample the same few channels of every token, and
    ViT activations have outlier channels."""
    sample = flat[::stride]
    k_sample = min(sample.numel(), (2 * k) // stride + 8)
    tau = sample.topk(k_sample, largest=largest).values[-1]
    kept = flat[flat >= tau] if largest else flat[flat <= tau]
    return kept if kept.numel() >= k else None


_MATCHES_TORCH = {}


def quantiles_match_torch(device):
    """Whether ``quantiles_rows_fast`` reproduces this torch's quantile bit for bit on ``device``.

    Where it does not, calibration stays correct (torch.quantile is used) but several times slower,
    which nothing else would reveal: hence the warning, once per device."""
    key = str(device)
    if key not in _MATCHES_TORCH:
        gen = torch.Generator().manual_seed(0)
        qs = [q for p in PERCENTILES for q in (p, 1.0 - p)]
        ok = True
        for n in (1, 2, 1001, 12345, 100003):
            x = (torch.randn(3, n, generator=gen) * 7).to(device)
            for q, fast in zip(qs, quantiles_rows_fast(x, qs)):
                ok &= torch.equal(torch.quantile(x, q, dim=1), fast)
        _MATCHES_TORCH[key] = bool(ok)
        if not ok:
            _logger.warning('the fast quantile search does not reproduce torch %s quantile on %s: calibration '
                            'uses torch.quantile instead (same values, slower); please report this torch version',
                            torch.__version__, key)
    return _MATCHES_TORCH[key]


def candidate_ranges(x2d):
    """(hi [rows], lo [rows]) of every percentile candidate, in PERCENTILES order."""
    qs = [q for p in PERCENTILES for q in (p, 1.0 - p)]
    if x2d.shape[1] > QUANTILE_TORCH_LIMIT or not quantiles_match_torch(x2d.device):
        vals = [quantile_rows(x2d, q) for q in qs]
    else:
        vals = quantiles_rows_fast(x2d, qs)
    return list(zip(vals[0::2], vals[1::2]))


def uniform_fake_quant(x, delta, zero_point, n_bits):
    """``(clamp(round(x / delta) + zp, 0, 2^n - 1) - zp) * delta``; delta/zp broadcast against x."""
    x_int = torch.round(x / delta)
    x_int.add_(zero_point).clamp_(0, 2 ** n_bits - 1)
    return x_int.sub_(zero_point).mul_(delta)


def uniform_fake_quant_ste(x, delta, zero_point, n_bits):
    """``uniform_fake_quant`` through the published differentiable graph: round passes the gradient straight
    through (RoundSTE), torch's clamp passes it where round(x / delta) + zp lies strictly inside (0, 2^n - 1)
    (torch 2.14 gives no gradient at the bounds themselves), so d x̂ / d x = 1 there (as (g · delta) / delta)
    and 0 elsewhere. The values equal the inference forms' (``uniform_fake_quant_integer_zp`` may give -0.0
    where this gives +0.0)."""
    x_int = RoundSTE.apply(x / delta) + zero_point
    return (torch.clamp(x_int, 0, 2 ** n_bits - 1) - zero_point) * delta


def uniform_fake_quant_integer_zp(x, delta, zero_point, n_bits, out=None):
    """``uniform_fake_quant`` for an integer-valued zero point, in two passes fewer:
    clamp(r + zp, 0, L) - zp == clamp(r, -zp, L - zp) for integers (exact below 2^24, and both
    saturate above). The values are equal; only a zero may come out as -0.0 instead of +0.0.
    Works in one new tensor (or ``out``): large CPU temporaries cost more than the arithmetic."""
    return torch.div(x, delta, out=out).round_().clamp_(-zero_point, 2 ** n_bits - 1 - zero_point).mul_(delta)


def uniform_sq_error(x, delta, zero_point, n_bits, out):
    """``(x - uniform_fake_quant(x))^2`` computed in the buffer ``out``, bit for bit: the candidate
    zero points are integers (rounded) or not finite, so the two-passes-shorter form gives the
    same values up to the sign of a zero, which squaring removes; (a - b)^2 == (b - a)^2 and
    e*e == e^2. The search reuses one buffer for every candidate."""
    if bool(torch.isfinite(zero_point).all()):
        uniform_fake_quant_integer_zp(x, delta, zero_point, n_bits, out=out).sub_(x)
    else:  # rare (a degenerate channel): the published formula's NaN / inf, so it is never chosen
        out.copy_(uniform_fake_quant(x, delta, zero_point, n_bits)).sub_(x)
    return out.mul_(out)


def uniform_candidate(hi, lo, n_bits):
    """(delta, zero_point) for clipping range [lo, hi]."""
    delta = (hi - lo) / (2 ** n_bits - 1)
    return delta, (-lo / delta).round()


def quantiles(x, ps, fast=True):
    """``[quantile(x, p) for p in ps]``; ``fast``: through ``quantiles_rows_fast`` where that is exact."""
    flat = x.reshape(1, -1)
    if fast and flat.shape[1] > QUANTILE_TORCH_LIMIT:  # one numpy call for every p: same values, one partition
        values = np.percentile(flat[0].cpu().numpy(), [p * 100 for p in ps])
        return [torch.tensor(v, device=x.device, dtype=torch.float32) for v in values]
    if not fast or not quantiles_match_torch(x.device):
        return [quantile(x, p) for p in ps]
    return [v[0] for v in quantiles_rows_fast(flat, ps)]


def search_uniform(x, n_bits, fast=True):
    """Published layer-wise search over all of ``x``: returns 0-dim (delta, zero_point).
    ``fast=False`` calls torch.quantile per candidate bound exactly as published."""
    best, delta, zero_point = _INIT_SCORE, None, None
    if fast:  # one copy of a strided view (k^T, a channel) beats strided reads in every pass
        x = x.contiguous()
    bounds = quantiles(x, [q for p in PERCENTILES for q in (p, 1.0 - p)], fast)
    scratch = torch.empty_like(x) if fast else None
    for hi, lo in zip(bounds[0::2], bounds[1::2]):
        d, z = uniform_candidate(hi, lo, n_bits)
        if fast:
            score = uniform_sq_error(x, d, z, n_bits, scratch).mean()
        else:
            score = (x - uniform_fake_quant(x, d, z, n_bits)).abs().pow(2).mean()
        if score < best:
            best, delta, zero_point = score, d, z
    if delta is None:
        raise ValueError("quantizer calibration failed: no clipping range gives a finite error "
                         f"(input is constant or not finite, e.g. min={x.min().item()}, max={x.max().item()})")
    return delta, zero_point


def search_uniform_rows(x2d, n_bits):
    """The same search for every row of [rows, values] at once: returns ([rows] delta, [rows] zp).

    One quantile call per candidate over all rows instead of one per row; the MSE rule and tie
    order (strictly smaller wins, earlier percentile kept) are the published ones.
    """
    rows = x2d.shape[0]
    best = torch.full((rows,), _INIT_SCORE, dtype=x2d.dtype, device=x2d.device)
    delta = torch.zeros(rows, dtype=x2d.dtype, device=x2d.device)
    zero_point = torch.zeros_like(delta)
    found = torch.zeros(rows, dtype=torch.bool, device=x2d.device)
    scratch = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    for hi, lo in candidate_ranges(x2d):
        d, z = uniform_candidate(hi, lo, n_bits)
        score = uniform_sq_error(x2d, d[:, None], z[:, None], n_bits, scratch).mean(dim=1)
        better = score < best
        best = torch.where(better, score, best)
        delta = torch.where(better, d, delta)
        zero_point = torch.where(better, z, zero_point)
        found |= better
    if not bool(found.all()):
        bad = torch.nonzero(~found).flatten()[:5].tolist()
        raise ValueError(f"quantizer calibration failed for channels {bad}: no clipping range gives a "
                         "finite error (a constant or non-finite channel)")
    return delta, zero_point


def channel_rows(x):
    """View ``x`` as [channels, values] the way channel-wise quantization groups it.

    [B, N, C] activations: per last dim (statistics over B and N); weights (2-D, 4-D): per dim 0.
    """
    if x.dim() == 3:
        return x.reshape(-1, x.shape[-1]).t()
    if x.dim() in (2, 4):
        return x.reshape(x.shape[0], -1)
    raise ValueError(f"channel-wise quantization of a {x.dim()}-D tensor is not defined (expected 2-, 3- or 4-D)")


def channel_shape(x):
    """Shape that broadcasts a per-channel vector back against ``x``."""
    return (1, 1, -1) if x.dim() == 3 else (-1,) + (1,) * (x.dim() - 1)


def search_uniform_channelwise(x, n_bits, per_channel_loop=False):
    """Channel-wise (delta, zero_point), already shaped to broadcast against ``x``.

    ``per_channel_loop`` runs the published one-channel-at-a-time search (reference and benchmark).
    """
    if per_channel_loop:
        n = x.shape[-1] if x.dim() == 3 else x.shape[0]
        pairs = [search_uniform(x[:, :, c] if x.dim() == 3 else x[c], n_bits, fast=False) for c in range(n)]
        delta = torch.stack([d for d, _ in pairs])
        zero_point = torch.stack([z for _, z in pairs])
    else:
        # [B, N, C] activations give a strided [C, B*N] view: one copy, then contiguous passes
        delta, zero_point = search_uniform_rows(channel_rows(x).contiguous(), n_bits)
    shape = channel_shape(x)
    return delta.reshape(shape), zero_point.reshape(shape)


def log_sqrt2_levels(delta, n_bits):
    """Dequantized value of every log-√2 level q = 0 .. 2^n - 1, then 0 for q >= 2^n (masked)."""
    q = torch.arange(2 ** n_bits + 1, dtype=delta.dtype, device=delta.device)
    levels = log_sqrt2_dequant(q, delta)
    levels[-1] = 0
    return levels


def log_sqrt2_dequant(q, delta):
    """``2^(-ceil(q/2)) * (1 + (q mod 2) * (√2 - 1)) * delta`` in the published operation order."""
    odd = (q % 2) * (math.sqrt(2) - 1) + 1
    return 2 ** (-1 * torch.ceil(q / 2)) * odd * delta


def log_sqrt2_index(x, delta, n_bits, out=None):
    """``round(-2 * log2(max(x / delta, 1e-6)))``, before masking and clamping (in ``out`` if given;
    -1 * v * 2 == v * -2 bit for bit). The max is ``fmax``, equal to the clamp for every number, which
    takes a NaN to 1e-6 (a level beyond 2^n, so 0 out) instead of keeping it: a NaN turned into an integer
    index would read outside the table (an IndexError, a device-side assert on CUDA), and a diverging
    QwT* run must stop with its one-line message. The published form gives NaN there."""
    out = torch.div(x, delta, out=out)
    floor = _LOG_FLOORS.get(out.device)
    if floor is None:  # one per device: no host-to-device copy per call
        floor = _LOG_FLOORS[out.device] = torch.tensor(1e-6, device=out.device)
    return torch.fmax(out, floor, out=out).log2_().mul_(-2).round_()


_LOG_FLOORS = {}


def log_sqrt2_fake_quant_reference(x, delta, n_bits):
    """The log-√2 quantizer written out as in SPEC §2 (reference for tests)."""
    x_int = torch.round(-1 * (x / delta).clamp(min=1e-6).log2() * 2)
    mask = x_int >= 2 ** n_bits
    x_quant = torch.clamp(x_int, 0, 2 ** n_bits - 1)
    x_float_q = log_sqrt2_dequant(x_quant, delta)
    x_float_q[mask] = 0
    return x_float_q


def log_sqrt2_fake_quant_ste(x, delta, n_bits):
    """The log-√2 quantizer with the published differentiable graph (RoundSTE, Log2STE, CeilSTE, MaskSTE in
    its operation order): the same values as ``log_sqrt2_fake_quant`` bit for bit, and the published
    gradient: with u = x / delta and q the clamped level, d x̂ / d x = (d x̂ / d q) · (-2 / (u ln 2)) / delta
    where u > 1e-6 and 0 < round(-2 log2 u) < 2^n - 1 (else 0: torch's clamp), with
    d x̂ / d q = delta · 2^-ceil(q/2) · ((√2 - 1) - ln 2 / 2 · (1 + (q mod 2)(√2 - 1)))."""
    x_int = RoundSTE.apply(-1 * Log2STE.apply(x / delta) * 2)
    mask = x_int >= 2 ** n_bits
    x_quant = torch.clamp(x_int, 0, 2 ** n_bits - 1)
    odd = (x_quant % 2) * (math.sqrt(2) - 1) + 1
    x_float_q = 2 ** (-1 * CeilSTE.apply(x_quant / 2)) * odd * delta
    return MaskSTE.apply(x_float_q, mask)


def log_sqrt2_fake_quant(x, delta, n_bits, out=None, index=None):
    """Same values as the reference, through a table of the 2^n + 1 possible outputs.

    Each output is one of 2^n levels or 0, computed by the same float32 operations, so indexing a
    table gives identical bits with a third of the elementwise passes (attention maps are large).
    ``out`` / ``index``: optional float / int32 buffers shaped like ``x`` to work in (int32: the
    CPU converts float32 to int32 several times faster than to int64; the levels are 0 .. 2^n).
    """
    values = log_sqrt2_index(x, delta, n_bits, out).clamp_(0, 2 ** n_bits)
    idx = values.int() if index is None else index.copy_(values)
    levels = log_sqrt2_levels(delta, n_bits)
    if not values.is_contiguous():
        return levels[idx]
    return torch.index_select(levels, 0, idx.view(-1), out=values.view(-1)).view(values.shape)


def search_log_sqrt2(x, n_bits, fast=True):
    """Published delta search of the log-√2 quantizer: the quantile with the smallest MSE.
    ``fast=False`` runs it literally as published (torch.quantile per candidate, the formula)."""
    if not fast:
        best, delta = _INIT_SCORE, None
        for p in PERCENTILES:
            d = quantile(x, p)
            score = (x - log_sqrt2_fake_quant_reference(x, d, n_bits)).abs().pow(2).mean()
            if score < best:
                best, delta = score, d
        if delta is None:
            raise ValueError("log-sqrt2 quantizer calibration failed: no candidate gives a finite error")
        return delta
    best, delta = _INIT_SCORE, None
    x = x.contiguous()
    scratch = torch.empty_like(x)
    index = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    for d in quantiles(x, PERCENTILES):
        if not bool(torch.isfinite(d)) or d <= 0:  # the published search scores such a delta NaN: never chosen
            continue
        err = log_sqrt2_fake_quant(x, d, n_bits, out=scratch, index=index).sub_(x)
        score = err.mul_(err).mean()  # (x̂ - x)^2 == (x - x̂)^2 bit for bit
        if score < best:
            best, delta = score, d
    if delta is None:
        raise ValueError("log-sqrt2 quantizer calibration failed: no candidate gives a finite error")
    return delta


class _CalibratedState(nn.Module):
    """Quantizer state as buffers, so that ``state_dict()`` holds the calibrated model and ``.to()``
    moves it.

    ``TENSORS`` (delta, zero point) are None until calibrated and their shape (per channel or not)
    is known only then: loading takes it from the file. ``FLAGS`` are bool buffers mirrored by a
    plain Python bool of the same name in the instance dict, which attribute lookup finds first:
    reading the buffer in every forward would synchronise with the GPU."""
    TENSORS = ()
    FLAGS = ()

    def _register_state(self, **flags):
        for name in self.TENSORS:
            self.register_buffer(name, None)
        for name, value in flags.items():
            self.register_buffer(name, torch.tensor(bool(value)))
            object.__setattr__(self, name, bool(value))

    def __setattr__(self, name, value):
        if name not in self.FLAGS:
            return super().__setattr__(name, value)
        if torch.is_tensor(value):  # load_state_dict(assign=True) hands over the file's tensor
            super().__setattr__(name, value)
        else:
            self._buffers[name].fill_(bool(value))
        object.__setattr__(self, name, bool(value))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        complete = prefix + 'inited' in state_dict  # a quantizer state, not some other file
        for name in self.TENSORS:
            key, current = prefix + name, self._buffers[name]
            if key in state_dict and (current is None or current.shape != state_dict[key].shape):
                like = current if current is not None else state_dict[key]
                self._buffers[name] = torch.empty(state_dict[key].shape, dtype=like.dtype,
                                                  device=self._buffers['inited'].device)
            elif key not in state_dict and complete:
                self._buffers[name] = None  # saved uncalibrated
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in self.FLAGS:
            object.__setattr__(self, name, bool(self._buffers[name]))


class UniformQuantizer(_CalibratedState):
    """Uniform affine fake quantizer, layer-wise or channel-wise, initialised on its first input.
    ``channel_wise`` is state too: the reparameterisation turns it off after calibration."""
    TENSORS = ('delta', 'zero_point')
    FLAGS = ('inited', 'channel_wise')

    def __init__(self, n_bits=8, channel_wise=False):
        super().__init__()
        _check_bits(n_bits)
        self.n_bits = int(n_bits)
        self.per_channel_loop = False  # True: the published one-channel-at-a-time search
        self.straight_through = False  # True: gradients pass as published (QwT*; set_straight_through)
        self._register_state(inited=False, channel_wise=channel_wise)
        self._zp_seen = None  # the zero_point tensor _integer_zp was computed for

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._zp_seen = None  # copied in place: the same tensor may now hold a fractional zero point

    def forward(self, x):
        if not self.inited:
            self.calibrate(x.detach())
        buffers = self._buffers  # one dict read each instead of nn.Module.__getattr__ (this runs per layer)
        delta, zero_point = buffers['delta'], buffers['zero_point']
        if self._zp_seen is not zero_point:  # once per calibration / reparameterisation / load
            self._integer_zp = bool(torch.equal(zero_point, zero_point.round()))
            self._zp_seen = zero_point
        if needs_ste(self, x):
            return uniform_fake_quant_ste(x, delta, zero_point, self.n_bits)
        if self._integer_zp:
            return uniform_fake_quant_integer_zp(x, delta, zero_point, self.n_bits)
        return uniform_fake_quant(x, delta, zero_point, self.n_bits)

    @torch.no_grad()
    def calibrate(self, x):
        if self.channel_wise:
            self.delta, self.zero_point = search_uniform_channelwise(x, self.n_bits, self.per_channel_loop)
        else:
            self.delta, self.zero_point = search_uniform(x, self.n_bits, fast=not self.per_channel_loop)
        self.inited = True

    def extra_repr(self):
        return f"n_bits={self.n_bits}, channel_wise={self.channel_wise}, inited={self.inited}"


class LogSqrt2Quantizer(_CalibratedState):
    """Log-√2 fake quantizer for post-softmax attention (layer-wise delta)."""
    TENSORS = ('delta',)
    FLAGS = ('inited',)

    def __init__(self, n_bits=8):
        super().__init__()
        _check_bits(n_bits)
        self.n_bits = int(n_bits)
        self.published_search = False  # True: the search exactly as published (reference, slow)
        self.straight_through = False  # True: gradients pass as published (QwT*; set_straight_through)
        self._register_state(inited=False)

    def forward(self, x):
        if not self.inited:
            self.calibrate(x.detach())
        if needs_ste(self, x):
            return log_sqrt2_fake_quant_ste(x, self._buffers['delta'], self.n_bits)
        return log_sqrt2_fake_quant(x, self._buffers['delta'], self.n_bits)

    @torch.no_grad()
    def calibrate(self, x):
        self.delta = search_log_sqrt2(x, self.n_bits, fast=not self.published_search)
        self.inited = True

    def extra_repr(self):
        return f"n_bits={self.n_bits}, inited={self.inited}"
