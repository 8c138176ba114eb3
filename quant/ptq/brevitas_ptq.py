"""Two post-training quantizers of brevitas (a third-party quantization library) behind the project's --ptq:
a statistics calibration ('min-max') and GPTQ (brevitas.graph.gptq). Which layers (the README says so too):
every nn.Linear and nn.Conv2d becomes a brevitas layer with per-output-channel weights (scale from the
channel's absolute maximum) and a per-tensor signed input quantizer (scale from the absolute maximum seen on
the calibration images); the first layer (ViT/Swin patch_embed, ResNet conv1) and the classifier (head,
head_dist, fc) at 8 bits, the others at --w_bits / --a_bits, as the project's RepQ-ViT and Percentile keep
their stems and heads at 8 bits. Attention matrix products, softmax, norms, GELU / ReLU and residual adds stay
float. Biases and outputs are not quantized."""
import torch
from torch import nn

EDGE_BITS = 8
FIRST_LAYERS = ('patch_embed.proj', 'conv1')
HEADS = ('head', 'head_dist', 'fc')


def _quantizers():
    """(weight quantizer, activation quantizer): brevitas's per-channel abs-max weights and a per-tensor signed
    activation quantizer whose scale is the absolute maximum of the calibration statistics."""
    from brevitas.inject.enum import StatsOp
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    class AbsMaxActPerTensor(Int8ActPerTensorFloat):
        scaling_stats_op = StatsOp.MAX  # brevitas's default is the 99.999th percentile

    return Int8WeightPerChannelFloat, AbsMaxActPerTensor


def edge_layers(model):
    """Names of the layers kept at 8 bits: the first layer and the classifier(s)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (n in FIRST_LAYERS or n in HEADS)]


def quantize_layers(model, w_bits, a_bits):
    """Swap every Linear / Conv2d of ``model`` for brevitas's QuantLinear / QuantConv2d (in place; the
    weights are copied over); returns ``model``."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    weight_quant, act_quant = _quantizers()

    def layer_map(w, a):
        kw = {'weight_quant': weight_quant, 'weight_bit_width': w, 'input_quant': act_quant, 'input_bit_width': a,
              'bias_quant': None, 'return_quant_tensor': False}
        from timm.models.layers.linear import Linear as TimmLinear  # ResNet's fc: brevitas matches exact classes
        return {nn.Linear: (qnn.QuantLinear, kw), TimmLinear: (qnn.QuantLinear, kw), nn.Conv2d: (qnn.QuantConv2d, kw)}

    edges = edge_layers(model)
    # brevitas builds each new layer with torch's initialisation before copying the weights over: those draws
    # are taken from a forked generator, so the run's later draws (the QwT images) are the default method's
    with torch.random.fork_rng(devices=[]):
        layerwise_quantize(model, layer_map(w_bits, a_bits), name_blacklist=edges)
        layerwise_quantize(model, layer_map(EDGE_BITS, EDGE_BITS))  # the rest: only the edges are left
    return model


def rank0_state(model):
    """Every parameter and buffer of ``model`` as rank 0 has it, inside a process group (no-op outside): the
    quantizers' scales and GPTQ's rounded weights are rank 0's decisions on every rank, as QwT's are."""
    from utils.core import distributed
    if distributed.is_initialized():
        for tensor in (*model.parameters(), *model.buffers()):
            distributed.broadcast(tensor.data)
    return model


def _batches(images, batch_size):
    return images.split(batch_size) if batch_size else (images,)


@torch.no_grad()
def calibrate(model, images, batch_size=None):
    """brevitas's calibration mode over ``images``: every activation quantizer takes its statistics."""
    from brevitas.graph.calibrate import calibration_mode
    with calibration_mode(model):
        for chunk in _batches(images, batch_size):
            model(chunk)


@torch.no_grad()
def minmax_ptq(model, calib_images, w_bits, a_bits, options=None, timings=None, progress=False):
    """brevitas min-max: quantized layers, then activation statistics from ``calib_images``. In place;
    returns ``model`` (eval mode). ``options`` (the run's flags) changes nothing here."""
    from utils.core.timing import Stopwatch
    model.eval()
    clock = Stopwatch(calib_images.device, ('wrap', 'calibrate'))
    with clock('wrap'):
        quantize_layers(model, w_bits, a_bits)
    with clock('calibrate'):
        calibrate(model, calib_images)
        rank0_state(model)
    if timings is not None:
        timings.update(clock.seconds)
    return model


@torch.no_grad()
def gptq_ptq(model, calib_images, w_bits, a_bits, options=None, timings=None, progress=False):
    """brevitas GPTQ: as ``minmax_ptq``, then each layer's weights rounded by GPTQ (brevitas.graph.gptq) on
    ``calib_images``, with the quantized activations of the layers before it. In place; returns ``model``."""
    from brevitas.graph.gptq import gptq_mode
    from utils.core.progress import progress_bar
    from utils.core.timing import Stopwatch
    minmax_ptq(model, calib_images, w_bits, a_bits, options, timings, progress)
    clock = Stopwatch(calib_images.device, ('gptq',))
    with clock('gptq'), gptq_mode(model, use_quant_activations=True) as gptq:
        bar = progress_bar(total=gptq.num_layers, desc='brevitas GPTQ', unit='layer', enabled=progress)
        for _ in range(gptq.num_layers):
            gptq.model(calib_images)
            gptq.update()
            bar.update(1)
        bar.close()
    rank0_state(model)
    if timings is not None:
        timings.update(clock.seconds)
    return model
