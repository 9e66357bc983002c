"""NF4 4-bit frozen experts in the bitsandbytes layout (quantize, dequantize, grouped experts)."""

from .experts import QuantizedGroupedExperts
from .nf4 import (
    NF4Tensor,
    absmax_fp32,
    dequantize_nf4,
    dequantize_nf4_experts,
    dynamic_code,
    quantize_nf4,
    stack_nf4,
)

__all__ = ["NF4Tensor", "QuantizedGroupedExperts", "absmax_fp32", "dequantize_nf4",
           "dequantize_nf4_experts",
           "dynamic_code", "quantize_nf4", "stack_nf4"]
