"""RepQ-ViT scale reparameterisation (SPEC §2, step 2): move channel-wise activation scales of the
inputs of qkv / fc1 / PatchMerging.reduction into the preceding LayerNorm and the layer's weights,
so the input quantizer becomes layer-wise without changing the network's function."""
import torch
from torch import nn

from quant.layers import QuantLinear


def reparam_factors(delta, zero_point):
    """Per-channel (delta_c, zp_c) -> (r, b, delta*, zp*) of SPEC §2 (zp* is a mean, not rounded)."""
    act_min = -zero_point * delta
    target_delta = torch.mean(delta)
    target_zero_point = torch.mean(zero_point)
    target_min = -target_zero_point * target_delta
    r = delta / target_delta
    b = act_min / r - target_min
    return r, b, target_delta, target_zero_point


def norm_linear_pairs(model):
    """(LayerNorm, quantized Linear with channel-wise input) pairs: norm1 -> attn.qkv,
    norm2 -> mlp.fc1 in every block, norm -> reduction in every Swin PatchMerging."""
    pairs = []
    for m in model.modules():
        for norm_name, path in (('norm1', ('attn', 'qkv')), ('norm2', ('mlp', 'fc1')), ('norm', ('reduction',))):
            norm, linear = getattr(m, norm_name, None), m
            for attr in path:
                linear = getattr(linear, attr, None)
            if isinstance(norm, nn.LayerNorm) and isinstance(linear, QuantLinear):
                pairs.append((norm, linear))
    return pairs


@torch.no_grad()
def reparameterize_pair(norm, linear):
    iq = linear.input_quantizer
    if not (iq.inited and iq.channel_wise):
        raise RuntimeError("reparameterisation needs a calibrated channel-wise input quantizer: "
                           "run one quantized forward pass first")
    r, b, target_delta, target_zero_point = reparam_factors(iq.delta.reshape(-1), iq.zero_point.reshape(-1))
    norm.weight.data = norm.weight.data / r
    norm.bias.data = norm.bias.data / r - b
    linear.weight.data = linear.weight.data * r
    shift = torch.mm(linear.weight.data, b.reshape(-1, 1)).reshape(-1)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data + shift
    else:
        linear.bias = nn.Parameter(shift)
    iq.channel_wise = False
    iq.delta, iq.zero_point = target_delta, target_zero_point
    linear.weight_quantizer.inited = False  # re-initialised by the next forward pass


def reparameterize(model):
    """Apply the reparameterisation to every LayerNorm -> channel-wise-input pair; returns their count."""
    pairs = norm_linear_pairs(model)
    for norm, linear in pairs:
        reparameterize_pair(norm, linear)
    return len(pairs)
