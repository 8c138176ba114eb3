"""What every QwT compensation kind's block fit gives the shared algorithm (quant/qwt.py), and the one
decision rule that keeps or drops a fit (SPEC §3, §3b)."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BlockFit:
    """One block's QwT fit: ``outs``, the next block's input (one tensor per batch); ``weight`` and
    ``bias``, zeros where the fit is not used; ``r2`` and ``rms`` (the kind's residual measure; None where
    no fit was made); ``fallback`` (the token-wise kind's quant.qwt_linear.Fallback, None where its solver
    worked); ``fp16_overflow``: a fit with r² > 0 left out, its largest |W|, |b| (beyond fp16); ``used``:
    the compensation is in (``decide``)."""
    outs: list
    weight: torch.Tensor
    bias: torch.Tensor
    r2: Optional[float] = None
    rms: Optional[float] = None
    fallback: Optional[object] = None
    fp16_overflow: Optional[float] = None
    used: bool = False


def fp16_overflow(weight, bias):
    """None where W and b survive the fp16 inference form, else their largest magnitude: a huge fit (an
    ill-conditioned system can still give r² > 0) overflows W.half() to inf and turns every logit to NaN."""
    if bool(torch.isfinite(weight.half()).all()) and bool(torch.isfinite(bias.half()).all()):
        return None
    return max(float(weight.abs().max()), float(bias.abs().max()))


def overflow_hint_for(solver):
    """What a block left out for an fp16 overflow can try: ``solver`` is the token-wise kind's (the published
    'inverse' or 'lstsq'), None for a kind without a choice of solver (ResNet's group convolution, whose
    script refuses --qwt_solver)."""
    return '--qwt_solver lstsq or more --qwt_samples' if solver == 'inverse' else 'more --qwt_samples'


def decide(allowed, r2, weight, bias):
    """(used, fp16 overflow): the published rule, a fit is used where the block index >= start_block
    (``allowed``) and r² > 0 (a NaN r² is not); this project also leaves out a fit that half precision
    cannot hold (its largest magnitude returned, else None)."""
    if not allowed or r2 is None or not r2 > 0:
        return False, None
    overflow = fp16_overflow(weight, bias)
    return overflow is None, overflow


def zeros_like_fit(weight, bias):
    """Zero compensation of the fit's shapes, dtype and device."""
    return torch.zeros_like(weight), torch.zeros_like(bias)
