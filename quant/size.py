"""Model size of SPEC §4: Σ numel × bits / 8 / 1e6 over parameters; a quantized layer's weight
counts its weight bits (the project's layers, and brevitas's for --ptq brevitas-*), a QwT W 16 bits,
everything else 32."""
from quant.layers import QuantConv2d, QuantLinear
from quant.qwt import CompensatedBlock

QWT_WEIGHT_BITS = 16
FLOAT_BITS = 32


def parameter_bits(model):
    """{id(parameter): bits} for the parameters that do not count 32 bits."""
    bits = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            bits[id(m.weight)] = m.weight_quantizer.n_bits
        elif isinstance(m, CompensatedBlock):
            bits[id(m.comp_weight)] = QWT_WEIGHT_BITS
        elif _brevitas_weight_bits(m) is not None:
            bits[id(m.weight)] = _brevitas_weight_bits(m)
    return bits


def _brevitas_weight_bits(module):
    """The weight bits of a brevitas quantized layer (duck-typed: brevitas is imported only by its runs)."""
    proxy = getattr(module, 'weight_quant', None)
    if proxy is None or not getattr(proxy, 'is_quant_enabled', False) or not hasattr(proxy, 'bit_width'):
        return None
    return int(proxy.bit_width())


def model_size_mb(model, include_compensation=True):
    """Size in MB; ``include_compensation=False`` leaves out the QwT parameters (the RepQ-ViT model)."""
    bits = parameter_bits(model)
    skip = set()
    if not include_compensation:
        for m in model.modules():
            if isinstance(m, CompensatedBlock):
                skip.update((id(m.comp_weight), id(m.comp_bias)))
    total = 0
    for p in model.parameters():
        if id(p) not in skip:
            total += p.numel() * bits.get(id(p), FLOAT_BITS)
    return total / 8 / 1e6
