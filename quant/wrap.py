"""Replace a model's layers with their quantized versions, following the table of SPEC §2."""
from dataclasses import dataclass

import torch
from torch import nn

from models.attention import MatMul
from quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

# Linear layers by their attribute name; 'w'/'a' stand for the requested bit widths.
#   name: (weight bits, input bits, channel-wise input)
LINEAR_RULES = {
    'qkv': ('w', 'a', True),          # input reparameterised to layer-wise after calibration
    'fc1': ('w', 'a', True),
    'reduction': ('w', 'a', True),    # Swin PatchMerging
    'proj': ('w', 'a', False),
    'fc2': ('w', 'a', False),
    'head': (8, 8, False),
    'head_dist': (8, 8, False),
}
PATCH_EMBED_BITS = 8  # patch_embed conv: 8-bit channel-wise weights, 8-bit layer-wise input


@dataclass(frozen=True)
class LayerPlan:
    """Quantizers one layer gets: weight bits (None for matmuls), input bits, input kind."""
    weight_bits: object
    input_bits: int
    input_channel_wise: bool = False
    log_sqrt2_a: bool = False  # matmul2: first operand (post-softmax) uses the log-√2 quantizer


def plan_layer(name, module, w_bits, a_bits):
    """The SPEC §2 plan for one module, or None if it stays in floating point."""
    leaf = name.rsplit('.', 1)[-1]
    pick = {'w': w_bits, 'a': a_bits}
    if isinstance(module, nn.Conv2d):
        return LayerPlan(PATCH_EMBED_BITS, PATCH_EMBED_BITS)
    if isinstance(module, nn.Linear):
        if leaf not in LINEAR_RULES:
            raise ValueError(f"no quantization rule for linear layer {name!r}: known layers are "
                             f"{', '.join(LINEAR_RULES)}")
        wb, ab, channel_wise = LINEAR_RULES[leaf]
        return LayerPlan(pick.get(wb, wb), pick.get(ab, ab), channel_wise)
    if isinstance(module, MatMul):
        if leaf not in ('matmul1', 'matmul2'):
            raise ValueError(f"no quantization rule for matrix product {name!r} (expected matmul1 or matmul2)")
        return LayerPlan(None, a_bits, log_sqrt2_a=leaf == 'matmul2')
    return None


def make_quant_layer(module, plan):
    if isinstance(module, MatMul):
        qa = LogSqrt2Quantizer(plan.input_bits) if plan.log_sqrt2_a else UniformQuantizer(plan.input_bits)
        return QuantMatMul(qa, UniformQuantizer(plan.input_bits))
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    return cls(module, UniformQuantizer(plan.weight_bits, channel_wise=True),
               UniformQuantizer(plan.input_bits, channel_wise=plan.input_channel_wise))


def quantize_model(model, w_bits, a_bits, plan=plan_layer):
    """Swap every Linear, Conv2d and MatMul of ``model`` for its quantized version, in place.
    Quantization starts switched off; returns ``model``. The quantizers' state is put on the model's
    device, so that all of its state dict is there. ``plan(name, module, w_bits, a_bits)``: the
    LayerPlan of a module or None (default: SPEC §2's table; ResNets: quant.percentile's)."""
    device = next(model.parameters()).device
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            plan_ = plan(full, child, w_bits, a_bits)
            if plan_ is not None:
                setattr(parent, child_name, make_quant_layer(child, plan_).to(device))
    return model


def replay_wrap_draws(model):
    """Make the draws of the published wrapping (SPEC §1b step 4) on torch's global generator.

    The published code builds a fresh ``nn.Linear(in, out)`` (always with a bias) for every Linear and a
    fresh ``nn.Conv2d`` for the patch embedding, on the CPU, in ``named_modules()`` order, and then puts
    the original weights in; their default initialisation consumes the generator that later draws the
    QwT images. This project wraps the original layers instead, so it builds the same throw-away layers,
    one at a time, only for their draws."""
    with torch.device('cpu'):
        for _, m in model.named_modules():
            if isinstance(m, nn.Linear):
                nn.Linear(m.in_features, m.out_features)
            elif isinstance(m, nn.Conv2d):
                nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                          m.groups, bias=m.bias is not None)
