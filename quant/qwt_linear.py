"""The token-wise kind of QwT compensation (SPEC §3; ViT, DeiT, Swin): after a block, a linear map of its
input tokens, ``[X, 1] @ [[W], [b]] ≈ Y``, fitted by least squares to the block's error (full precision minus
quantized). Its compensated block class, its fit (two ways of accumulating, two solvers, the fallbacks that
keep a failed solve from breaking a run) and its messages; the walk around it is quant/qwt.py's."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from quant.layers import set_quant_state
from quant.qwt_fit import BlockFit, decide, overflow_hint_for
from quant.qwt_targets import switch_pair
from quant.regression import (SINGULAR_CONDITION, NonFiniteSystem, NormalEquations, fit_concat, r2_score,
                              rank_and_condition, solve_normal, with_ones)
from utils.core import distributed

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


def _zeros_like_fit(c_in, c_out, ref):
    return (torch.zeros(c_in, c_out, dtype=ref.dtype, device=ref.device),
            torch.zeros(c_out, dtype=ref.dtype, device=ref.device))


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
    """``pair(x)``: (full-precision, quantized) outputs of the block (default: its quantizers off, then on).
    Two block passes per batch (full precision, quantized) feeding normal equations on the
    device; the next features reuse the quantized outputs instead of a third pass.

    Where the ``solver`` fit fails (singular, inf/NaN in the normal equations or the solution), the
    float64 least-squares fit of the same tokens replaces it (normal equations summed again in float64
    from this process's features and targets and all-reduced, so every process takes the same
    decision), and r² is computed for that fit; where that fails too, zero compensation."""
    c_in = xs[0].shape[-1]
    pair = pair or switch_pair(block)
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
    used, overflow = decide(True, r2, weight, bias)
    if used:
        with clock('passes'):
            xws = xws or [x @ weight for x in xs]
            outs = [q.add_(xw).add_(bias) for q, xw in zip(q_outs, xws)]  # float32 form: (block(x) + x @ W) + b
    else:
        outs, (weight, bias) = q_outs, _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    return BlockFit(outs, weight, bias, r2, rms, fallback, overflow, used)


def _fit_block_concat(block, xs, fit, solver, clock, pair=None):
    """The published procedure: concatenate every token, solve with the inverse formula, then a
    third pass through the compensated block to get the next features.

    Where the ``solver`` fit fails (singular, inf/NaN in [X,1]^T[X,1] or in the solution), the float64
    least-squares fit of the same tokens replaces it; where that fails too, zero compensation."""
    pair = pair or switch_pair(block)
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
    used, overflow = decide(fit, r2, weight, bias)
    if not used:
        weight, bias = _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    comp = CompensatedBlock(block, weight, bias)
    with clock('passes'):
        outs = [comp.forward_fp32(x) for x in xs]
    return BlockFit(outs, weight, bias, r2, rms, fallback, overflow, used)


FALLBACK_WARNING = 'QwT block %d: %s (%d tokens for %d unknowns per output); %s. Hint: %s.'
SINGULAR_WARNING = ('QwT block %d: the float32 inverse of [X,1]^T[X,1] is numerically singular (rank %d of %d, '
                    'condition %.1e) and its fit has r2 %.4g, so the published procedure leaves this block '
                    'uncompensated; --qwt_solver lstsq fits it')


@dataclass(frozen=True)
class TokenLinear:
    """The token-wise kind and its options: ``solver`` 'inverse' (published float32 inverse) or 'lstsq'
    (float64 least squares); ``accumulate`` 'concat' (published: every token at once, features gathered
    from every process, a third pass per block) or 'normal' (normal equations summed batch by batch and
    all-reduced, two passes per block)."""
    solver: str = 'inverse'
    accumulate: str = 'concat'
    block_class = CompensatedBlock
    residual = 'rms residual'
    nan_note = ''

    def __post_init__(self):
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"unknown accumulate mode {self.accumulate!r}: use one of {', '.join(ACCUMULATE)}")

    def features(self, xs, batch_size):
        """The first block's inputs: 'concat' fits every process's tokens, so it gathers them once."""
        if self.accumulate == 'concat' and distributed.is_initialized():
            return list(distributed.all_gather_cat(torch.cat(xs)).split(batch_size))
        return xs

    def fit(self, block, pair, xs, allowed, clock):
        """The block's BlockFit (its decision and next features included); 'normal' fits only where
        ``allowed`` (block index >= start_block), 'concat' always (for the r²), as before."""
        fit = _fit_block_normal if self.accumulate == 'normal' else _fit_block_concat
        return fit(block, xs, allowed, self.solver, clock, pair)

    def warnings(self, block_id, fitted):
        """(format, *args) of the warning for a failed primary solve, before the block's INFO line."""
        fb = fitted.fallback
        if fb is None:
            return []
        used = ('fitted with float64 least squares instead' if fb.kind == 'lstsq' else
                'the block gets zero compensation'
                + (f' (float64 least squares: {REASONS[fb.why_not]})' if fb.why_not else ''))
        hint = 'more --qwt_samples' + ('' if self.solver == 'lstsq' else ' or --qwt_solver lstsq')
        return [(FALLBACK_WARNING, block_id, REASONS[fb.reason], fb.tokens, fb.unknowns, used, hint)]

    @property
    def overflow_hint(self):
        return overflow_hint_for(self.solver)

    def singular(self, xs, fitted, clock):
        """(rank, unknowns, condition) where the published inverse left the block out for a numerically
        singular system (rank 0's finding on every process), else None."""
        if (self.solver != 'inverse' or fitted.used or fitted.r2 is None or fitted.fallback is not None
                or fitted.fp16_overflow is not None):
            return None
        with clock('fit'):
            return distributed.agree(broken_fit(xs, fitted.r2))

    @staticmethod
    def singular_warning(block_id, r2, broken):
        return (SINGULAR_WARNING, block_id, *broken, r2)
