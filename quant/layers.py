"""Quantized versions of the layers RepQ-ViT touches: Linear, the patch-embedding Conv2d and the
attention matrix products. Each keeps the original parameters (same state-dict keys as timm) and
fake-quantizes its weight and/or inputs when switched on."""
import torch.nn.functional as F
from torch import nn

from models.attention import MatMul
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer


class _QuantWeightLayer:
    """What QuantLinear and QuantConv2d share: the original parameters and two quantizers."""

    def _setup(self, layer, weight_quantizer, input_quantizer):
        self.weight, self.bias = layer.weight, layer.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.use_weight_quant = False
        self.use_input_quant = False

    def _quantized(self, x):
        """(input, weight), each fake-quantized when switched on."""
        if self.use_input_quant:
            x = self.input_quantizer(x)
        return x, self.weight_quantizer(self.weight) if self.use_weight_quant else self.weight


class QuantLinear(_QuantWeightLayer, nn.Linear):
    def __init__(self, linear, weight_quantizer, input_quantizer):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear, weight_quantizer, input_quantizer)

    def forward(self, x):
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)


class QuantConv2d(_QuantWeightLayer, nn.Conv2d):
    _CONV_ATTRS = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                   'transposed', 'output_padding', 'groups', 'padding_mode', '_reversed_padding_repeated_twice')

    def __init__(self, conv, weight_quantizer, input_quantizer):
        nn.Module.__init__(self)
        for name in self._CONV_ATTRS:
            setattr(self, name, getattr(conv, name))
        self._setup(conv, weight_quantizer, input_quantizer)

    def forward(self, x):
        x, w = self._quantized(x)
        return self._conv_forward(x, w, self.bias)


class QuantMatMul(MatMul):
    """``A @ B`` with both operands fake-quantized (A by the log-√2 quantizer for post-softmax)."""

    def __init__(self, quantizer_a, quantizer_b):
        super().__init__()
        self.quantizer_A = quantizer_a
        self.quantizer_B = quantizer_b
        self.use_input_quant = False

    def forward(self, a, b):
        if self.use_input_quant:
            a, b = self.quantizer_A(a), self.quantizer_B(b)
        return a @ b


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)


def set_quant_state(module, weight_quant, act_quant):
    """Switch weight / activation fake quantization of every quantized layer under ``module``."""
    for m in module.modules():
        if isinstance(m, QUANT_LAYERS):
            m.use_input_quant = act_quant
            if not isinstance(m, QuantMatMul):
                m.use_weight_quant = weight_quant


def quantizers(module):
    """Every (qualified name, quantizer) under ``module``, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer))]
