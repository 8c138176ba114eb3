"""The group-convolution kind of QwT compensation (SPEC §3b, the published ResNet rows): after each residual
block, a grouped convolution of the block's input fitted by ridge regression to the error between the
full-precision and the quantized block. The math is in pure functions, then its compensated block class and
the kind with its options; the walk around it is quant/qwt.py's."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.qwt_fit import BlockFit, decide, overflow_hint_for, zeros_like_fit
from quant.qwt_linear import CompensatedBlock
from quant.qwt_targets import switch_pair
from utils.core import distributed
from utils.core.errors import UserError

DEFAULT_KERNEL_SIZE = 1   # --kernel_size of the published script
DEFAULT_FACTOR = 64       # --factor: input channels per group (groups = max(C_in // factor, 1))
RIDGE = 1e-3              # added to every diagonal entry of AᵀA, the bias's included (the ViT path has none)


def check_conv_qwt_args(kernel_size, factor, channels=()):
    """One-line UserError for a kernel size or factor the group-convolution compensation cannot use.
    ``channels``: (input, output) channels of the blocks to compensate (models.block_channels): the
    groups max(C_in // factor, 1) must divide both."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"--kernel_size {kernel_size} is not an odd size >= 1 (padding k // 2 keeps the block's "
                        "output size only for odd k): use 1 (published default) or 3")
    if not isinstance(factor, int) or factor < 1:
        raise UserError(f"--factor {factor} must be a whole number >= 1 (input channels per group): use 64 "
                        "(published default)")
    for c_in, c_out in channels:
        groups = conv_groups(c_in, factor)
        if c_in % groups or c_out % groups:
            raise UserError(f"--factor {factor} makes {groups} groups of {c_in} input channels, which do not split "
                            f"{c_in} input and {c_out} output channels evenly: use a factor that divides the "
                            "channel counts, such as 64 (published default)")


def conv_groups(c_in, factor):
    """The published grouping: max(C_in // factor, 1) groups."""
    return max(c_in // factor, 1)


def conv_stride(x_shape, y_shape):
    """1 where the block keeps H, W; 2 where it halves them (floor, as published); else an error."""
    (h, w), (h_out, w_out) = tuple(x_shape[-2:]), tuple(y_shape[-2:])
    if (h, w) == (h_out, w_out):
        return 1
    if (h // 2, w // 2) == (h_out, w_out):
        return 2
    raise ValueError(f"group-convolution QwT needs a block that keeps or halves its input's height and width; "
                     f"this one maps {h}x{w} to {h_out}x{w_out}")


def fit_group_conv(x, y, kernel_size, groups, stride):
    """Per group j: rows = the k×k patches (stride s, padding k//2) of input channels j·C_in/g ... at every
    output position of every sample plus a ones column, targets = output channels j·C_out/g ...; solution
    inverse(AᵀA + RIDGE·I) · Aᵀ · Y in float32. Returns the grouped conv weight [C_out, C_in/g, k, k] and
    bias [C_out]. x [B, C_in, H, W], y [B, C_out, H', W']."""
    b, c_in = x.shape[:2]
    c_out = y.shape[1]
    cin_g, cout_g = c_in // groups, c_out // groups
    unfold = nn.Unfold(kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)
    weights, biases = [], []
    for j in range(groups):
        patches = unfold(x[:, j * cin_g:(j + 1) * cin_g])  # [B, cin_g·k·k, L]
        a = patches.permute(0, 2, 1).reshape(-1, cin_g * kernel_size * kernel_size)
        targets = y[:, j * cout_g:(j + 1) * cout_g].view(b, cout_g, -1).permute(0, 2, 1).reshape(-1, cout_g)
        a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device)], dim=1)
        gram = a.T @ a
        gram = gram + RIDGE * torch.eye(gram.shape[0], device=a.device)
        solution = torch.inverse(gram) @ a.T @ targets  # [cin_g·k·k + 1, cout_g], evaluated left to right
        weights.append(solution[:-1, :].T)
        biases.append(solution[-1, :])
    weight = torch.cat(weights, dim=0).view(c_out, c_in // groups, kernel_size, kernel_size)
    return weight, torch.cat(biases, dim=0)


# r² = 1 - 0/0: said where it is printed (random weights give it: a block whose output is the same, often all
# zeros, on every image).
NAN_R2 = (" (r2 nan: the block's quantization error is the same on every QwT image, so there is nothing for the "
          "map to explain; seen with random weights)")


def conv_fit_scores(x, y, weight, bias, stride, groups):
    """(r², mean absolute residual) of the fit, 0-dim tensors: r² = 1 - Σ(Y - Ŷ)² / Σ(Y - Ȳ)² with Ȳ the
    mean over the sample dimension only (per channel and position), Ŷ the float32 convolution with bias."""
    y_pred = F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2, groups=groups)
    abs_err = (y - y_pred).abs().mean()
    ss_tot = torch.sum((y - y.mean(dim=0)).pow(2))
    ss_res = torch.sum((y - y_pred).pow(2))
    return 1 - ss_res / ss_tot, abs_err


class CompensatedConvBlock(CompensatedBlock):
    """``out = block(x) + conv2d(x, W, b)``, W [C_out, C_in/g, k, k]: stride from the shapes (conv_stride),
    groups C_in / W's second dimension, padding k // 2. At inference the convolution runs in half precision
    without bias, then float32 plus b, as published; ``forward_fp32`` is the float32 form with the bias
    that feeds the next block while fitting. W counts 16 bits in the model size."""

    def _conv(self, x, out, weight, bias):
        return F.conv2d(x, weight, bias, stride=conv_stride(x.shape, out.shape), padding=weight.shape[-1] // 2,
                        groups=x.shape[1] // weight.shape[1])

    def forward(self, x):
        if not self.enabled:
            return self.block(x)
        if self.training:  # the published training branch (QwT*): float32 with the bias
            return self.forward_fp32(x)
        out = self.block(x)
        comp = self._conv(x.half(), out, self.comp_weight.half(), None).float() + self.comp_bias.reshape(1, -1, 1, 1)
        return out + comp

    def forward_fp32(self, x):
        out = self.block(x)
        return out + self._conv(x, out, self.comp_weight.float(), self.comp_bias)


def fit_block(block, xs, kernel_size, factor, pair=None):
    """The published fit of one block on this process's inputs ``xs`` (one tensor per batch), with inputs
    and targets gathered from every process: (W, b, r², mean absolute residual), the last two 0-dim.
    ``pair(x)``: (full-precision, quantized) outputs of the block (default: its quantizers off, then on)."""
    pair = pair or switch_pair(block)
    fps, qs = zip(*[pair(x) for x in xs])
    y = torch.cat(fps) - torch.cat(qs)
    del fps, qs
    x = distributed.all_gather_cat(torch.cat(xs))
    y = distributed.all_gather_cat(y)
    groups = conv_groups(x.shape[1], factor)
    check_conv_qwt_args(kernel_size, factor, [(x.shape[1], y.shape[1])])
    stride = conv_stride(x.shape, y.shape)
    weight, bias = fit_group_conv(x, y, kernel_size, groups, stride)
    r2, abs_err = conv_fit_scores(x, y, weight, bias, stride, groups)
    return weight, bias, r2, abs_err


@dataclass(frozen=True)
class GroupConv:
    """The group-convolution kind and its options: ``kernel_size`` (odd, published 1) and ``factor`` (input
    channels per group, published 64). One solver, the published ridge inverse; every block is fitted (for
    its r²), also below start_block. Inside a process group every rank ends with rank 0's W, b and r²
    (broadcast), so every decision is the same on every rank."""
    kernel_size: int = DEFAULT_KERNEL_SIZE
    factor: int = DEFAULT_FACTOR
    block_class = CompensatedConvBlock
    residual = 'mean abs residual'
    overflow_hint = overflow_hint_for(None)
    nan_note = NAN_R2

    def __post_init__(self):
        check_conv_qwt_args(self.kernel_size, self.factor)

    @staticmethod
    def features(xs, batch_size):
        return xs  # the fit gathers each block's inputs and targets itself

    def fit(self, block, pair, xs, allowed, clock):
        with clock('fit'):
            weight, bias, r2, abs_err = fit_block(block, xs, self.kernel_size, self.factor, pair)
            scores = torch.stack([r2, abs_err]).float()
            for t in (weight, bias, scores):  # rank 0's fit everywhere: no rank can decide otherwise
                distributed.broadcast(t)
            r2_value, abs_value = float(scores[0]), float(scores[1])
        used, overflow = decide(allowed, r2_value, weight, bias)
        if not used:
            weight, bias = zeros_like_fit(weight, bias)
        comp = CompensatedConvBlock(block, weight, bias)
        with clock('passes'):  # float32 with the bias, as the published training-mode pass
            outs = [comp.forward_fp32(x) for x in xs]
        return BlockFit(outs, weight, bias, r2_value, abs_value, None, overflow, used)

    @staticmethod
    def warnings(block_id, fitted):
        return []

    @staticmethod
    def singular(xs, fitted, clock):
        return None
