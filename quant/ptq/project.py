"""The project's own quantizers as --ptq methods: RepQ-ViT (ViT, DeiT, Swin) and Percentile (ResNet), with the
run's flags, exactly as the published scripts call them."""
from quant.percentile import percentile_ptq
from quant.repq import repq_vit


def repq(model, calib_images, w_bits, a_bits, options, timings=None, progress=False):
    per_channel = getattr(options, 'calib_search', 'vectorized') == 'per_channel'
    return repq_vit(model, calib_images, w_bits, a_bits, per_channel_loop=per_channel, timings=timings,
                    progress=progress)


def percentile(model, calib_images, w_bits, a_bits, options, timings=None, progress=False):
    per_channel = getattr(options, 'calib_search', 'vectorized') == 'per_channel'
    conv_a_bits = getattr(options, 'conv_a_bits', '8')
    conv_input_bits = a_bits if conv_a_bits == 'a_bits' else None  # None: the published 8 bits
    return percentile_ptq(model, calib_images, w_bits, a_bits, conv_input_bits=conv_input_bits,
                          per_channel_loop=per_channel, timings=timings, progress=progress)
