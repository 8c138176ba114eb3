"""RepQ-ViT post-training quantization and QwT compensation."""
from quant.layers import QuantConv2d, QuantLinear, QuantMatMul, set_quant_state
from quant.qwt import CompensatedBlock, qwt_compensate, set_compensation
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from quant.repq import repq_vit
from quant.size import model_size_mb

__all__ = ['repq_vit', 'qwt_compensate', 'set_quant_state', 'set_compensation', 'model_size_mb',
           'CompensatedBlock', 'QuantLinear', 'QuantConv2d', 'QuantMatMul', 'UniformQuantizer', 'LogSqrt2Quantizer']
