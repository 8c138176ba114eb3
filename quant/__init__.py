"""RepQ-ViT (ViT, Swin) and Percentile (ResNet) post-training quantization and QwT compensation."""
from quant.layers import QuantConv2d, QuantLinear, QuantMatMul, set_quant_state
from quant.qwt import CompensatedBlock, compensated_blocks, qwt_compensate, set_compensation
from quant.qwt_conv import CompensatedConvBlock, check_conv_qwt_args
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from quant.percentile import percentile_ptq
from quant.repq import repq_vit
from quant.size import model_size_mb

__all__ = ['repq_vit', 'percentile_ptq', 'qwt_compensate', 'compensated_blocks', 'set_quant_state', 'set_compensation',
           'model_size_mb', 'CompensatedBlock', 'CompensatedConvBlock', 'check_conv_qwt_args', 'QuantLinear',
           'QuantConv2d', 'QuantMatMul', 'UniformQuantizer', 'LogSqrt2Quantizer']
