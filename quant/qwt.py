"""QwT compensation (SPEC §3): after each quantized block, a linear map of the block's input fitted
by least squares to the error between the full-precision and the quantized block."""
import logging

import torch
from torch import nn
from tqdm import tqdm

from models import stem, walk
from quant.layers import set_quant_state
from quant.regression import NormalEquations, fit_concat, r2_score, solve_normal
from utils import distributed

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

    def forward(self, x):
        out = self.block(x)
        if not self.enabled:
            return out
        return out + (x.half() @ self.comp_weight.half()).float() + self.comp_bias

    def forward_fp32(self, x):
        """The float32 form used to propagate features while fitting."""
        return self.block(x) + x @ self.comp_weight + self.comp_bias


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


def _fit_block_normal(block, xs, fit, solver):
    """Two block passes per batch (full precision, quantized); normal equations on the device;
    the next features reuse the quantized outputs instead of a third pass."""
    if not fit:
        set_quant_state(block, True, True)
        outs = [block(x) for x in xs]
        return outs, _zeros_like_fit(xs[0].shape[-1], outs[0].shape[-1], outs[0]), None
    neq, q_outs, errors, tokens = None, [], [], 0
    for x in xs:
        fp, q = _fp_and_quant(block, x)
        y = fp - q
        if neq is None:
            # float64 sums for the float64 solver, so its rank cut-off sees the features, not float32 sums
            neq = NormalEquations(x.shape[-1], y.shape[-1], x.device,
                                  torch.float64 if solver == 'lstsq' else torch.float32)
        neq.add(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        q_outs.append(q)
        errors.append(y)
        tokens += y.numel() // y.shape[-1]
    distributed.all_reduce_sum(neq.gram, neq.rhs)
    count = torch.tensor([tokens], dtype=torch.float64, device=neq.gram.device)
    distributed.all_reduce_sum(count)
    tokens = int(count.item())
    weight, bias = solve_normal(neq.gram, neq.rhs, solver)
    y_mean = neq.y_sum / tokens
    sums = torch.zeros(3, dtype=torch.float64, device=weight.device)  # SS_res, SS_tot, sum |residual|
    for i, x in enumerate(xs):
        xw = x @ weight
        residual = errors[i] - (xw + bias)
        sums += torch.stack([residual.pow(2).sum(), (errors[i] - y_mean).pow(2).sum(), residual.abs().sum()]).double()
        errors[i] = xw  # keep x @ W for the next features
    distributed.all_reduce_sum(sums)
    r2 = float(1 - sums[0] / sums[1])
    abs_err = float(sums[2] / (tokens * weight.shape[1]))
    if r2 > 0:
        outs = [q + xw + bias for q, xw in zip(q_outs, errors)]  # float32 form: block(x) + x @ W + b
    else:
        outs, (weight, bias) = q_outs, _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    return outs, (weight, bias), (r2, abs_err)


def _fit_block_concat(block, xs, fit, solver):
    """The published procedure: concatenate every token, solve, then a third pass through the
    compensated block to get the next features."""
    fps, qs = zip(*[_fp_and_quant(block, x) for x in xs])
    x_all = torch.cat(xs).reshape(-1, xs[0].shape[-1])
    y_all = (torch.cat(fps) - torch.cat(qs)).reshape(-1, fps[0].shape[-1])
    del fps, qs
    weight, bias = fit_concat(x_all, y_all, solver)
    y_pred = x_all @ weight + bias
    r2 = float(r2_score(y_all, y_pred))
    abs_err = float((y_all - y_pred).abs().mean())
    if not (fit and r2 > 0):
        weight, bias = _zeros_like_fit(weight.shape[0], weight.shape[1], weight)
    comp = CompensatedBlock(block, weight, bias)
    return [comp.forward_fp32(x) for x in xs], (weight, bias), (r2, abs_err)


@torch.no_grad()
def qwt_compensate(q_model, images, start_block=0, batch_size=32, solver='inverse', accumulate='normal',
                   progress=False, stats=None):
    """Fit and insert QwT compensation into the quantized ``q_model`` (in place); returns it.

    ``images``: this process's QwT images [N, 3, H, W]; inside a process group the fit uses every
    process's images. Blocks with index < ``start_block`` (Swin: counted across stages) and blocks
    whose fit has r² <= 0 get zero compensation. ``solver``: 'inverse' (published float32 inverse)
    or 'lstsq' (float64 least squares). ``accumulate``: 'normal' (normal equations batch by batch,
    all-reduced) or 'concat' (the published concatenate-then-invert, features gathered from every
    process). ``stats``: optional list that receives one dict per block.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"unknown accumulate mode {accumulate!r}: use one of {', '.join(ACCUMULATE)}")
    device = next(q_model.parameters()).device
    q_model.eval()
    set_quant_state(q_model, True, True)
    xs = [stem(q_model, chunk.to(device, non_blocking=True)) for chunk in images.split(batch_size)]
    if accumulate == 'concat' and distributed.is_initialized():
        xs = list(distributed.all_gather_cat(torch.cat(xs)).split(batch_size))
    fit_block = _fit_block_normal if accumulate == 'normal' else _fit_block_concat
    block_id = 0
    for slot in tqdm(walk(q_model), desc='QwT', disable=not progress, leave=False):
        module = slot.module
        if slot.kind == 'merge':  # Swin PatchMerging: quantized, not compensated
            xs = [module(x) for x in xs]
            continue
        xs, (weight, bias), fit_info = fit_block(module, xs, block_id >= start_block, solver)
        slot.replace(CompensatedBlock(module, weight, bias))
        used = bool(weight.any())
        if fit_info is not None:
            _logger.info('QwT block %d: r2 %.4f, mean |residual| %.6f, %s', block_id, fit_info[0], fit_info[1],
                         'compensated' if used else 'zero compensation')
        if stats is not None:
            stats.append({'block': block_id, 'r2': None if fit_info is None else fit_info[0], 'used': used})
        block_id += 1
    return q_model
