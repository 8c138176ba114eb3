"""QwT compensation (SPEC §3, §3b, §6): one algorithm with two kinds of compensation. Walk the blocks in
order; per block, the full-precision and the quantized outputs on the same input (the compensated quantized
path's features), a fit of their difference from the block's input, the decision to use it, the compensated
block in its place, and its output as the next block's input. The kinds hold the fit math and the
compensated block class: the token-wise linear map (ViT, DeiT, Swin; quant/qwt_linear.py) and the group
convolution (ResNet; quant/qwt_conv.py)."""
import logging
import math

import torch

from models import family_of, resnet, stem, walk
from quant.layers import set_quant_state
from quant.qwt_conv import GroupConv
from quant.qwt_fit import fp16_overflow  # noqa: F401  (re-exported: part of this module's interface)
from quant.qwt_linear import ACCUMULATE, CompensatedBlock, TokenLinear
from quant.qwt_targets import check_fp_model, model_pair, switch_pair
from utils.core.errors import UserError
from utils.core.progress import progress_bar
from utils.core.timing import Stopwatch

_logger = logging.getLogger(__name__)
__all__ = ['qwt_compensate', 'compensated_blocks', 'set_compensation', 'CompensatedBlock', 'ACCUMULATE',
           'fp16_overflow']

OVERFLOW_WARNING = ('QwT block %d: its fit (r2 %.4g) holds values up to %.3g, beyond half precision (65504), so '
                    'the fp16 compensation at inference would give inf and NaN logits; the block is left '
                    'uncompensated. Hint: %s.')


def compensated_blocks(model):
    """Every compensated block of ``model`` (either kind), in module order."""
    return [m for m in model.modules() if isinstance(m, CompensatedBlock)]


def set_compensation(model, enabled):
    """Switch every compensation term of ``model`` on or off (off = the quantized model)."""
    for m in compensated_blocks(model):
        m.enabled = enabled


def compensation_kind(q_model, solver='inverse', accumulate='concat', kernel_size=1, factor=64):
    """The kind of compensation for ``q_model``'s family with its options, checked: the group convolution for
    a ResNet (one solver), else the token-wise linear map."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"unknown accumulate mode {accumulate!r}: use one of {', '.join(ACCUMULATE)}")
    if family_of(q_model) is resnet:
        if (solver, accumulate) != ('inverse', 'concat'):
            raise UserError(f"QwT for ResNets has the published ridge solver only (solver 'inverse', accumulate "
                            f"'concat'), not solver {solver!r}, accumulate {accumulate!r}: leave both at their "
                            "defaults")
        return GroupConv(kernel_size, factor)
    return TokenLinear(solver, accumulate)


def _pairs(q_model, fp_model, first_images):
    """Per walk step, x -> (full-precision, quantized) outputs: fp_model's matching block (checked first,
    fp_model in eval mode) or, without one, q_model's block with its quantizers off, then on."""
    q_slots = walk(q_model)
    if fp_model is None:
        return [switch_pair(s.module) for s in q_slots]
    fp_model.eval()
    check_fp_model(q_model, fp_model, first_images)
    return [model_pair(f.module, q.module) for q, f in zip(q_slots, walk(fp_model))]


def _block_stats(block_id, fitted, broken):
    r2 = None if fitted.r2 is None or not math.isfinite(fitted.r2) else fitted.r2  # JSON has no NaN
    return {'block': block_id, 'r2': r2, 'used': fitted.used,
            'fallback': None if fitted.fallback is None else fitted.fallback.kind,
            'singular': broken is not None, 'fp16_overflow': fitted.fp16_overflow is not None,
            **({'rank': broken[0], 'unknowns': broken[1],
                'condition': broken[2] if math.isfinite(broken[2]) else None} if broken else {})}


@torch.no_grad()
def qwt_compensate(q_model, images, start_block=0, batch_size=32, solver='inverse', accumulate='concat',
                   progress=False, stats=None, timings=None, kernel_size=1, factor=64, fp_model=None):
    """Fit and insert QwT compensation into the quantized ``q_model`` (in place); returns it.

    ``fp_model``: the full-precision model whose blocks correspond one to one to ``q_model``'s (same family,
    walk and block output shapes; checked on the first batch, one UserError line naming the first mismatch).
    Each block's full-precision target is then fp_model's matching block on the same input, so ``q_model``
    may be quantized by anything. Without it, the target is q_model's block with the project's quantizers
    switched off (the published procedure). Either way the first block's input is q_model's stem and Swin's
    PatchMerging layers are q_model's.

    A ResNet gets the group-convolution compensation of SPEC §3b (quant/qwt_conv.py): ``kernel_size``
    (odd, default 1) and ``factor`` (input channels per group, default 64) apply to it alone, and it has
    one solver (the published ridge inverse: ``solver`` 'inverse', ``accumulate`` 'concat').

    ``images``: this process's QwT images [N, 3, H, W]; inside a process group the fit uses every
    process's images, and every decision is rank 0's. Blocks with index < ``start_block`` (Swin: counted
    across stages) and blocks whose fit has r² <= 0 get zero compensation. ``solver``: 'inverse'
    (published float32 inverse) or 'lstsq' (float64 least squares). ``accumulate``: 'concat' (default:
    the published procedure, every token concatenated, features gathered from every process, a third
    pass per block) or 'normal' (normal equations summed batch by batch on the device and all-reduced,
    two passes per block: the same fit to float tolerance, several times faster; later blocks drift from
    the published result as float differences flip the rounding of some fake-quantized activations).

    Where a block's ``solver`` fit fails ([X,1]^T[X,1] singular, inf/NaN in it or in the solution W, b),
    a warning names the block and the block is fitted by float64 least squares ('lstsq') instead, with
    its r² rule as usual; where even that has no finite solution (inf/NaN features or targets), the
    block gets zero compensation. A fit with r² > 0 whose W or b half precision cannot hold is left out
    (zero compensation, one warning).

    ``stats``: optional list that receives one dict per block: 'block' (index), 'r2' (None where no
    fit was made), 'used' (compensation non-zero), 'fallback' (None normally, 'lstsq' where the
    float64 least-squares fallback replaced the failed fit, 'zero' where that failed too), 'singular',
    'fp16_overflow'. ``timings``: optional dict that receives the seconds spent in block passes
    ('passes') and fitting ('fit').
    """
    kind = compensation_kind(q_model, solver, accumulate, kernel_size, factor)
    device = next(q_model.parameters()).device
    q_model.eval()
    set_quant_state(q_model, True, True)  # a model quantized by other means has none of these layers: no-op
    pairs = _pairs(q_model, fp_model, images[:batch_size])
    clock = Stopwatch(device, ('passes', 'fit'))
    with clock('passes'):
        xs = [stem(q_model, chunk.to(device, non_blocking=True)) for chunk in images.split(batch_size)]
    xs = kind.features(xs, batch_size)
    slots = walk(q_model)
    # counts the blocks the log counts, not Swin's PatchMerging steps
    bar = progress_bar(total=sum(s.kind == 'block' for s in slots), desc='QwT', unit='block', enabled=progress)
    block_id = 0
    for slot, pair in zip(slots, pairs):
        module = slot.module
        if slot.kind == 'merge':  # Swin PatchMerging: quantized, not compensated
            with clock('passes'):
                xs = [module(x) for x in xs]
            continue
        fitted = kind.fit(module, pair, xs, block_id >= start_block, clock)
        slot.replace(kind.block_class(module, fitted.weight, fitted.bias))
        for warning in kind.warnings(block_id, fitted):
            _logger.warning(*warning)
        if fitted.fp16_overflow is not None:
            _logger.warning(OVERFLOW_WARNING, block_id, fitted.r2, fitted.fp16_overflow, kind.overflow_hint)
        if fitted.r2 is not None:
            _logger.info('QwT block %d: r2 %.4f, %s %.6f, %s%s', block_id, fitted.r2, kind.residual, fitted.rms,
                         'compensated' if fitted.used else 'zero compensation',
                         '' if math.isfinite(fitted.r2) else kind.nan_note)
        broken = kind.singular(xs, fitted, clock)
        if broken:
            _logger.warning(*kind.singular_warning(block_id, fitted.r2, broken))
        xs = fitted.outs
        if stats is not None:
            stats.append(_block_stats(block_id, fitted, broken))
        block_id += 1
        bar.update(1)
    bar.close()
    if timings is not None:
        timings.update(clock.seconds)
    return q_model
