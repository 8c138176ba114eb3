"""RepQ-ViT post-training quantization (SPEC §2): wrap, calibrate on one batch, reparameterise,
re-calibrate."""
from contextlib import contextmanager

import torch

from quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, set_quant_state
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from quant.reparam import reparameterize
from quant.wrap import quantize_model, replay_wrap_draws
from utils.core.progress import progress_bar
from utils.core.timing import Stopwatch


def _device_of(model):
    return next(model.parameters()).device


@torch.no_grad()
def repq_vit(model, calib_images, w_bits, a_bits, per_channel_loop=False, timings=None, progress=False):
    """Quantize ``model`` in place with RepQ-ViT and return it (eval mode, quantization on).

    ``calib_images``: one batch, [32, 3, 224, 224] in the published setting, run in one forward pass.
    ``per_channel_loop``: run the calibration as published: the one-channel-at-a-time quantizer
    search, torch.quantile per candidate and a second forward pass for step (3) (same result, slow).
    ``timings``: optional dict that receives seconds for 'calibrate', 'reparameterize', 'recalibrate'.
    ``progress``: a bar over the quantized layers as the calibration pass initialises them.
    """
    timings = {} if timings is None else timings
    replay_wrap_draws(model)
    quantize_model(model, w_bits, a_bits)
    model.eval()  # after wrapping, so the new quantized modules are in eval mode too
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            m.per_channel_loop = per_channel_loop
        elif isinstance(m, LogSqrt2Quantizer):
            m.published_search = per_channel_loop
    x = calib_images.to(_device_of(model), non_blocking=True)
    set_quant_state(model, weight_quant=True, act_quant=True)
    watch = Stopwatch(x.device)
    with watch('calibrate'), layer_progress(model, progress):  # (1) initialises every quantizer
        model(x)
    with watch('reparameterize'):     # (2) scale reparameterisation
        reparameterize(model)
    with watch('recalibrate'):        # (3) re-initialises the reset weight quantizers
        if per_channel_loop:
            model(x)                  # as published: a second forward pass
        else:
            recalibrate_weights(model)
    timings.update(watch.seconds)
    return model


@torch.no_grad()
def recalibrate_weights(model):
    """Step (3): initialise every weight quantizer the reparameterisation reset.

    The published code runs a second forward pass of the calibration batch for this; a weight
    quantizer initialises on its weight alone and every other quantizer is already initialised,
    so initialising them directly leaves the same state without the forward pass."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and not m.weight_quantizer.inited:
            m.weight_quantizer.calibrate(m.weight.detach())


@contextmanager
def layer_progress(model, enabled, desc='RepQ-ViT calibration'):
    """A progress bar that advances as each quantized layer finishes its first forward (where its
    quantizers initialise: the slow part of calibration)."""
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    bar = progress_bar(total=len(layers), desc=desc, unit='layer', enabled=enabled)

    def advance(*_):  # a forward hook's return value would replace the layer's output
        bar.update(1)
    handles = [m.register_forward_hook(advance) for m in layers] if enabled else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        bar.close()
