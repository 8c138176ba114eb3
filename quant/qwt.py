"""QwT compensation (SPEC §3): after each quantized block, a linear map of the block's input fitted
by least squares to the error between the full-precision and the quantized block."""
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models import family_of, resnet, stem, walk
from quant.layers import set_quant_state
from quant.qwt_targets import check_fp_model, model_pair
from quant.regression import (SINGULAR_CONDITION, NonFiniteSystem, NormalEquations, fit_concat, r2_score,
                              rank_and_condition, solve_normal, with_ones)
from utils.core import distributed
from utils.core.errors import UserError
from utils.core.progress import progress_bar
from utils.core.timing import Stopwatch

_logger = logging.getLogger(__name__)
ACCUMULATE = ('normal', 'concat')


class CompensatedBlock(nn.Module):
    """``out = block(x) + x @ W + b``. At inference the product runs in half precision, as published;
    W counts as 16 bits in the model size. ``enabled = False`` gives the plain quantized block."""

    def __init__(self, block, weight, bias):
        super().__init__()
        self.block = block
        self.comp_weight = nn.Parameter(weight, requires_grad=False)  # [C_in, C_out]
        self.comp_bias = nn.Parameter(bias, requires_grad=False)
        self.enabled = True
        self.train(block.training)  # a wrapper in the model's mode, not nn.Module's default (training)

    def forward(self, x):
        if not self.enabled:
            return self.block(x)
        if self.training:  # the published training branch (QwT*): float32, so W and b get exact gradients
            return self.forward_fp32(x)
        out = self.block(x)
        return out + (x.half() @ self.comp_weight.half()).float() + self.comp_bias

    def forward_fp32(self, x):
        """The float32 form: the training branch, and the features that feed the next block while fitting."""
        return self.block(x) + x @ self.comp_weight.float() + self.comp_bias


def compensated_blocks(model):
    return [m for m in model.modules() if isinstance(m, CompensatedBlock)]


def set_compensation(model, enabled):
    """Switch every compensation term of ``model`` on or off (off = the RepQ-ViT model)."""
    for m in compensated_blocks(model):
        m.enabled = enabled


def _fp_and_quant(block, x):
    set_quant_state(block, False, False)
    fp = block(x)
    set_quant_state(block, True, True)
    return fp, block(x)


def _zeros_like_fit(c_in, c_out, ref):
    return torch.zeros(c_in, c_out, dtype=ref.dtype, device=ref.device), torch.zeros(c_out, dtype=ref.dtype, device=ref.device)


def moment_ss_res(gram, rhs, y_sq, w1):
    """SS_res from the normal equations alone, ΣY² - 2<W1, [X,1]ᵀY> + <W1, [X,1]ᵀ[X,1] W1>, in float64,
    or None where the three terms cancel too much for float32 sums to be trusted (a huge W from a
    near-singular system): then the caller measures it on the tokens."""
    g, r, w = gram.double(), rhs.double(), w1.double()
    cross, quad = (w * r).sum(), (w * (g @ w)).sum()
    ss_res = y_sq - 2 * cross + quad
    if ss_res < 1e-2 * (y_sq.abs() + 2 * cross.abs() + quad.abs()):
        return None
    return ss_res


REASONS = {
    'singular': 'the least-squares matrix [X,1]^T[X,1] is singular',
    'non-finite matrix': 'the least-squares system holds inf or NaN',
    'non-finite solution': 'the solved W, b hold inf or NaN',
}


@dataclass(frozen=True)
class Fallback:
    """A block whose ``solver`` fit failed: ``kind`` 'lstsq' (float64 least squares replaced it) or
    'zero' (that failed too); ``reason`` / ``why_not``: keys of REASONS for the two failures
    (``why_not`` None where the float64 fit worked or was not tried, being the failed solver)."""
    kind: str
    reason: str
    tokens: int
    unknowns: int
    why_not: Optional[str] = None


@dataclass
class BlockFit:
    """One block's QwT fit: ``outs``, the next block's input (one tensor per batch); ``weight`` [C_in,
    C_out] and ``bias`` [C_out], zeros where the fit is not used; ``r2`` and ``rms`` (None where no
    fit was made); ``fallback`` (None where the ``solver`` fit worked)."""
    outs: list
    weight: torch.Tensor
    bias: torch.Tensor
    r2: Optional[float] = None
    rms: Optional[float] = None
    fallback: Optional[Fallback] = None
    fp16_overflow: Optional[float] = None  # a fit with r² > 0 left out: the largest |W|, |b| (beyond fp16)


def _attempt(solve):
    """((W, b), None) from ``solve()``, or (None, reason) where it fails: a singular matrix (the
    inverse raises), inf/NaN in the system, or a non-finite solution."""
    try:
        weight, bias = solve()
    except torch.linalg.LinAlgError:
        return None, 'singular'
    except NonFiniteSystem:
        return None, 'non-finite matrix'
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        return None, 'non-finite solution'
    return (weight, bias), None


def _agreed_attempt(solve, c_in, c_out, like):
    """``_attempt(solve)`` as rank 0 saw it, on every process: its failure reason, or its W, b
    (broadcast). Every process then goes on with the same fit and the same branch, whatever its own
    float results were."""
    wb, reason = _attempt(solve)
    if not distributed.is_initialized():
        return wb, reason
    reason = distributed.agree(reason)
    if reason is not None:
        return None, reason
    if wb is None:  # this process failed where rank 0 did not: receive rank 0's fit
        wb = _zeros_like_fit(c_in, c_out, like)
    return distributed.agree_tensors(*wb), None


def _solve_with_fallback(solver, solve, solve_float64, tokens, unknowns, like):
    """((W, b) or None, Fallback or None): ``solve()``, the ``solver`` fit; where it fails,
    ``solve_float64()``, the float64 least-squares fit of the same tokens, unless ``solver`` is that
    one already. Rank 0's outcome on every process (``like``: a float tensor of the fit's dtype and
    device; W is [unknowns - 1, C_out])."""
    c_in, c_out = unknowns - 1, like.shape[-1]
    wb, reason = _agreed_attempt(solve, c_in, c_out, like)
    if reason is None:
        return wb, None
    why_not = None
    if solver != 'lstsq':
        wb, why_not = _agreed_attempt(solve_float64, c_in, c_out, like)
    return wb, Fallback('zero' if wb is None else 'lstsq', reason, tokens, unknowns, why_not)


def fp16_overflow(weight, bias):
    """None where W and b survive the fp16 inference form, else their largest magnitude: a huge fit (an
    ill-conditioned system can still give r² > 0) overflows W.half() to inf and turns every logit to NaN."""
    if bool(torch.isfinite(weight.half()).all()) and bool(torch.isfinite(bias.half()).all()):
        return None
    return max(float(weight.abs().max()), float(bias.abs().max()))


def _warn_fp16_overflow(block_id, peak, r2, solver):
    _logger.warning('QwT block %d: its fit (r2 %.4g) holds values up to %.3g, beyond half precision (65504), so '
                    'the fp16 compensation at inference would give inf and NaN logits; the block is left '
                    'uncompensated. Hint: %s.', block_id, r2, peak,
                    'more --qwt_samples' if solver == 'lstsq' else '--qwt_solver lstsq or more --qwt_samples')


def _warn_fallback(block_id, fallback, solver):
    """One warning line per block whose primary solve failed."""
    used = ('fitted with float64 least squares instead' if fallback.kind == 'lstsq' else
            'the block gets zero compensation'
            + (f' (float64 least squares: {REASONS[fallback.why_not]})' if fallback.why_not else ''))
    hint = 'more --qwt_samples' + ('' if solver == 'lstsq' else ' or --qwt_solver lstsq')
    _logger.warning('QwT block %d: %s (%d tokens for %d unknowns per output); %s. Hint: %s.',
                    block_id, REASONS[fallback.reason], fallback.tokens, fallback.unknowns, used, hint)


# A least-squares fit with a bias term is never worse than none (r² >= 0); an r² below this is the
# float32 inverse's rounding, not the data.
R2_BROKEN = -0.01


def broken_fit(xs, r2):
    """For a block left uncompensated by the published inverse: (rank, dimension, condition number) of its
    float64 [X,1]^T[X,1] (all-reduced over processes) when that system is numerically singular (condition
    at least SINGULAR_CONDITION, or r² below R2_BROKEN), else None."""
    c = xs[0].shape[-1]
    gram = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=xs[0].device)
    for x in xs:
        x1 = with_ones(x.reshape(-1, c).double())
        gram += x1.t() @ x1
    distributed.all_reduce_sum(gram)
    rank, condition = rank_and_condition(gram)
    return (rank, c + 1, condition) if condition >= SINGULAR_CONDITION or r2 < R2_BROKEN else None


def _warn_broken(block_id, r2, rank, dim, condition):
    """One warning line per block that the published procedure leaves out for a singular system."""
    _logger.warning('QwT block %d: the float32 inverse of [X,1]^T[X,1] is numerically singular (rank %d of %d, '
                    'condition %.1e) and its fit has r2 %.4g, so the published procedure leaves this block '
                    'uncompensated; --qwt_solver lstsq fits it', block_id, rank, dim, condition, r2)


def _float64_normal_equations(xs, ys):
    """Normal equations and ΣY² of these features and targets summed in float64 (all-reduced)."""
    c_in, c_out = xs[0].shape[-1], ys[0].shape[-1]
    neq = NormalEquations(c_in, c_out, xs[0].device, torch.float64)
    y_sq = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for x, y in zip(xs, ys):
        y = y.reshape(-1, c_out).double()
        neq.add(x.reshape(-1, c_in), y)
        y_sq += torch.dot(y.reshape(-1), y.reshape(-1))
    distributed.all_reduce_sum(neq.gram, neq.rhs, y_sq)
    return neq, y_sq


def _fit_block_normal(block, xs, fit, solver, clock, pair=None):
    """Two block passes per batch (full precision, quantized) feeding normal equations on the
    device; the next features reuse the quantized outputs instead of a third pass.

    Where the ``solver`` fit fails (singular, inf/NaN in the normal equations or the solution), the
    float64 least-squares fit of the same tokens replaces it (normal equations summed again in float64
    from this process's features and targets and all-reduced, so every process takes the same
    decision), and r² is computed for that fit; where that fails too, zero compensation."""
    c_in = xs[0].shape[-1]
    pair = pair or (lambda x: _fp_and_quant(block, x))
    if not fit:
        with clock('passes'):
            set_quant_state(block, True, True)
            outs = [block(x) for x in xs]
        return BlockFit(outs, *_zeros_like_fit(c_in, outs[0].shape[-1], outs[0]))
    neq, q_outs, ys = None, [], []
    y_sq = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for x in xs:
        with clock('passes'):
            fp, q = pair(x)
        with clock('fit'):
            y = fp.sub_(q).reshape(-1, q.shape[-1])
            if neq is None:
                # float64 sums for the float64 solver, so its rank cut-off sees the features, not float32 sums
                neq = NormalEquations(x.shape[-1], y.shape[-1], x.device,
                                      torch.float64 if solver == 'lstsq' else torch.float32)
            neq.add(x.reshape(-1, x.shape[-1]), y)
            y_sq += torch.dot(y.reshape(-1), y.reshape(-1)).double()  # BLAS dot: no squared temporary
        q_outs.append(q)
        ys.append(y.view_as(q))
    xws = None
    with clock('fit'):
        count = torch.tensor(float(sum(x.numel() // x.shape[-1] for x in xs)), dtype=torch.float64, device=y_sq.device)
        distributed.all_reduce_sum(neq.gram, neq.rhs, y_sq, count)

        def solve_float64():  # the r² below is then that of the float64 system
            nonlocal neq, y_sq
            neq, y_sq = _float64_normal_equations(xs, ys)
            return solve_normal(neq.gram, neq.rhs, 'lstsq')
        wb, fallback = _solve_with_fallback(solver, lambda: solve_normal(neq.gram, neq.rhs, solver), solve_float64,
                                            int(count), c_in + 1, q_outs[0])
        if wb is None:
            return BlockFit(q_outs, *_zeros_like_fit(c_in, q_outs[0].shape[-1], q_outs[0]), fallback=fallback)
        weight, bias = wb
        ss_tot = y_sq - neq.rhs[-1].double().pow(2).sum() / count  # ΣY² - |ΣY|² / n
        ss_res = moment_ss_res(neq.gram, neq.rhs, y_sq, torch.cat([weight, bias[None]]))
        if distributed.agree(ss_res is None):  # measure on the tokens, keeping x @ W for the next features
            xws = [x @ weight for x in xs]
            ss_res = sum(torch.dot(r.reshape(-1), r.reshape(-1)).double()
                         for r in (y - (xw + bias) for y, xw in zip(ys, xws)))
            distributed.all_reduce_sum(ss_res)
        mine = None if ss_res is None else (  # None: a process that measured nothing takes rank 0's values
            float(1 - ss_res / ss_tot), (max(float(ss_res), 0.0) / (float(count) * weight.shape[1])) ** 0.5)
        r2, rms = distributed.agree(mine)
    del ys
    overflow = fp16_overflow(weight, bias) if r2 > 0 else None
    if r2 > 0 and overflow is None:
        with clock('passes'):
            xws = xws or [x @ weight for x in xs]
            outs = [q.add_(xw).add_(bias) for q, xw in zip(q_outs, xws)]  # float32 form: (block(x) + x @ W) + b
    else:
        outs, (weight, bias) = q_outs, _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    return BlockFit(outs, weight, bias, r2, rms, fallback, overflow)


def _fit_block_concat(block, xs, fit, solver, clock, pair=None):
    """The published procedure: concatenate every token, solve with the inverse formula, then a
    third pass through the compensated block to get the next features.

    Where the ``solver`` fit fails (singular, inf/NaN in [X,1]^T[X,1] or in the solution), the float64
    least-squares fit of the same tokens replaces it; where that fails too, zero compensation."""
    pair = pair or (lambda x: _fp_and_quant(block, x))
    with clock('passes'):
        fps, qs = zip(*[pair(x) for x in xs])
    with clock('fit'):
        x_all = torch.cat(xs).reshape(-1, xs[0].shape[-1])
        y_all = (torch.cat(fps) - torch.cat(qs)).reshape(-1, fps[0].shape[-1])
        del fps
        wb, fallback = _solve_with_fallback(solver, lambda: fit_concat(x_all, y_all, solver),
                                            lambda: fit_concat(x_all, y_all, 'lstsq'),
                                            x_all.shape[0], x_all.shape[1] + 1, y_all)
        if wb is None:
            return BlockFit(list(qs), *_zeros_like_fit(x_all.shape[1], y_all.shape[1], y_all), fallback=fallback)
        weight, bias = wb
        del qs
        y_pred = x_all @ weight + bias
        r2, rms = distributed.agree((float(r2_score(y_all, y_pred)), float((y_all - y_pred).pow(2).mean().sqrt())))
        del x_all, y_all, y_pred
    overflow = fp16_overflow(weight, bias) if fit and r2 > 0 else None
    if not (fit and r2 > 0) or overflow is not None:
        weight, bias = _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    comp = CompensatedBlock(block, weight, bias)
    with clock('passes'):
        outs = [comp.forward_fp32(x) for x in xs]
    return BlockFit(outs, weight, bias, r2, rms, fallback, overflow)


def _fp_slots(q_model, fp_model, first_images):
    """fp_model's walk, checked against q_model's (fp_model in eval mode), or Nones without one."""
    if fp_model is None:
        return [None] * len(walk(q_model))
    fp_model.eval()
    check_fp_model(q_model, fp_model, first_images)
    return walk(fp_model)


@torch.no_grad()
def qwt_compensate(q_model, images, start_block=0, batch_size=32, solver='inverse', accumulate='concat',
                   progress=False, stats=None, timings=None, kernel_size=1, factor=64, fp_model=None):
    """Fit and insert QwT compensation into the quantized ``q_model`` (in place); returns it.

    A ResNet gets the group-convolution compensation of SPEC §3b (quant/qwt_conv.py): ``kernel_size``
    (odd, default 1) and ``factor`` (input channels per group, default 64) apply to it alone, and it has
    one solver (the published ridge inverse: ``solver`` 'inverse', ``accumulate`` 'concat').

    ``images``: this process's QwT images [N, 3, H, W]; inside a process group the fit uses every
    process's images. Blocks with index < ``start_block`` (Swin: counted across stages) and blocks
    whose fit has r² <= 0 get zero compensation. ``solver``: 'inverse' (published float32 inverse)
    or 'lstsq' (float64 least squares). ``accumulate``: 'concat' (default: the published procedure,
    every token concatenated, features gathered from every process, a third pass per block) or
    'normal' (normal equations summed batch by batch on the device and all-reduced, two passes per
    block: the same fit to float tolerance, several times faster; later blocks drift from the published
    result as float differences flip the rounding of some fake-quantized activations).

    Where a block's ``solver`` fit fails ([X,1]^T[X,1] singular, inf/NaN in it or in the solution W, b),
    a warning names the block and the block is fitted by float64 least squares ('lstsq') instead, with
    its r² rule as usual; where even that has no finite solution (inf/NaN features or targets), the
    block gets zero compensation.

    ``stats``: optional list that receives one dict per block: 'block' (index), 'r2' (None where no
    fit was made), 'used' (compensation non-zero), 'fallback' (None normally, 'lstsq' where the
    float64 least-squares fallback replaced the failed fit, 'zero' where that failed too).
    ``timings``: optional dict that receives the seconds spent in block passes ('passes') and
    least-squares fitting ('fit').
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"unknown accumulate mode {accumulate!r}: use one of {', '.join(ACCUMULATE)}")
    if family_of(q_model) is resnet:
        if (solver, accumulate) != ('inverse', 'concat'):
            raise UserError(f"QwT for ResNets has the published ridge solver only (solver 'inverse', accumulate "
                            f"'concat'), not solver {solver!r}, accumulate {accumulate!r}: leave both at their defaults")
        from quant.qwt_conv import compensate_conv
        return compensate_conv(q_model, images, start_block, batch_size, kernel_size, factor, progress, stats,
                               timings, fp_model)
    device = next(q_model.parameters()).device
    q_model.eval()
    set_quant_state(q_model, True, True)
    fp_slots = _fp_slots(q_model, fp_model, images[:batch_size])
    xs = [stem(q_model, chunk.to(device, non_blocking=True)) for chunk in images.split(batch_size)]
    if accumulate == 'concat' and distributed.is_initialized():
        xs = list(distributed.all_gather_cat(torch.cat(xs)).split(batch_size))
    fit_block = _fit_block_normal if accumulate == 'normal' else _fit_block_concat
    clock = Stopwatch(device, ('passes', 'fit'))
    block_id = 0
    slots = walk(q_model)
    # counts the blocks the log counts, not Swin's PatchMerging steps
    bar = progress_bar(total=sum(s.kind == 'block' for s in slots), desc='QwT', unit='block', enabled=progress)
    for slot, fp_slot in zip(slots, fp_slots):
        module = slot.module
        if slot.kind == 'merge':  # Swin PatchMerging: quantized, not compensated
            with clock('passes'):
                xs = [module(x) for x in xs]
            continue
        fitted = fit_block(module, xs, block_id >= start_block, solver, clock,
                           None if fp_slot is None else model_pair(fp_slot.module, module))
        slot.replace(CompensatedBlock(module, fitted.weight, fitted.bias))
        used = bool(fitted.weight.any())
        if fitted.fallback is not None:
            _warn_fallback(block_id, fitted.fallback, solver)
        if fitted.fp16_overflow is not None:
            _warn_fp16_overflow(block_id, fitted.fp16_overflow, fitted.r2, solver)
        if fitted.r2 is not None:
            _logger.info('QwT block %d: r2 %.4f, rms residual %.6f, %s', block_id, fitted.r2, fitted.rms,
                         'compensated' if used else 'zero compensation')
        broken = None
        if (solver == 'inverse' and not used and fitted.r2 is not None and fitted.fallback is None
                and fitted.fp16_overflow is None):
            with clock('fit'):
                broken = distributed.agree(broken_fit(xs, fitted.r2))
            if broken:
                _warn_broken(block_id, fitted.r2, *broken)
        xs = fitted.outs
        if stats is not None:
            r2 = None if fitted.r2 is None or not math.isfinite(fitted.r2) else fitted.r2  # JSON has no NaN
            stats.append({'block': block_id, 'r2': r2, 'used': used,
                          'fallback': None if fitted.fallback is None else fitted.fallback.kind,
                          'singular': broken is not None, 'fp16_overflow': fitted.fp16_overflow is not None,
                          **({'rank': broken[0], 'unknowns': broken[1],
                              'condition': broken[2] if math.isfinite(broken[2]) else None} if broken else {})})
        block_id += 1
        bar.update(1)
    bar.close()
    if timings is not None:
        timings.update(clock.seconds)
    return q_model
