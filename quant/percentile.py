"""The "Percentile" quantizer of the published ResNet rows (SPEC §3b): every Conv2d and the fc become
quantized layers (BatchNorm, ReLU, pooling and the residual adds stay in float), calibrated by one forward
pass of the calibration batch; each quantizer initialises on the first tensor it sees with SPEC §2's
percentile / MSE search. No reparameterisation."""
import functools

import torch
from torch import nn

from quant.layers import set_quant_state
from quant.quantizers import UniformQuantizer, _check_bits
from quant.repq import layer_progress
from quant.wrap import LayerPlan, quantize_model, replay_wrap_draws
from utils.core.timing import Stopwatch

# The published QuantConv2d overrides its input bits with 8 whatever --a_bits: the published "W4/A4" and
# "W6/A6" ResNet rows are W4/A8 and W6/A8 in effect. The stem conv1 and the fc are 8-bit throughout.
PUBLISHED_CONV_INPUT_BITS = 8
STEM_AND_FC_BITS = 8
STEM = 'conv1'  # the published rule: the top-level module named exactly 'conv1'


def plan_resnet_layer(name, module, w_bits, a_bits, conv_input_bits=None):
    """The LayerPlan of one ResNet module (None: stays in float). Weights channel-wise, inputs layer-wise.
    ``conv_input_bits``: None as published (8 bits for every conv input); n: n-bit inputs for every conv
    but the stem (an opt-in, not the published procedure)."""
    if isinstance(module, nn.Conv2d):
        if name == STEM:
            return LayerPlan(STEM_AND_FC_BITS, STEM_AND_FC_BITS)
        return LayerPlan(w_bits, PUBLISHED_CONV_INPUT_BITS if conv_input_bits is None else conv_input_bits)
    if isinstance(module, nn.Linear):
        if 'fc' not in name:  # the published wrapper knows no other linear layer
            raise ValueError(f"no quantization rule for linear layer {name!r} of a ResNet (expected fc)")
        return LayerPlan(STEM_AND_FC_BITS, STEM_AND_FC_BITS)
    return None


def quantize_resnet(model, w_bits, a_bits, conv_input_bits=None):
    """Swap the ResNet's Conv2d and fc layers for quantized ones (quantization off); returns ``model``."""
    return quantize_model(model, w_bits, a_bits,
                          plan=functools.partial(plan_resnet_layer, conv_input_bits=conv_input_bits))


@torch.no_grad()
def percentile_ptq(model, calib_images, w_bits, a_bits, conv_input_bits=None, per_channel_loop=False,
                   timings=None, progress=False):
    """Quantize the timm ResNet ``model`` in place with the published Percentile procedure and return it
    (eval mode, quantization on).

    ``a_bits`` is checked and recorded but, as published, moves nothing: conv inputs are 8-bit unless
    ``conv_input_bits`` (opt-in) gives their bits; the stem conv1 and fc stay 8-bit. ``per_channel_loop``:
    the published one-channel-at-a-time weight search (same parameters, slow). ``timings``: optional dict
    that receives the seconds of 'calibrate'. ``progress``: a bar over the quantized layers.
    """
    for bits in (w_bits, a_bits) + (() if conv_input_bits is None else (conv_input_bits,)):
        _check_bits(bits)
    replay_wrap_draws(model)  # the published wrapper builds fresh Conv2d / Linear layers: their init draws
    quantize_resnet(model, w_bits, a_bits, conv_input_bits)
    model.eval()
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            m.per_channel_loop = per_channel_loop
    x = calib_images.to(next(model.parameters()).device, non_blocking=True)
    set_quant_state(model, weight_quant=True, act_quant=True)
    watch = Stopwatch(x.device)
    with watch('calibrate'), layer_progress(model, progress, desc='Percentile calibration'):
        model(x)  # each quantizer initialises on the first tensor it sees
    if timings is not None:
        timings.update(watch.seconds)
    return model
