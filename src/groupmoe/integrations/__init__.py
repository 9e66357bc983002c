"""Drop-in integrations with other libraries (each imports its library lazily)."""

from .quantized import NF4Parametrization, QuantizeReport, expert_lora_targets, quantize_experts
from .transformers import (
    PatchReport,
    patch,
    patched,
    register,
    unpatch,
    use_experts_implementation,
)

__all__ = ["NF4Parametrization", "PatchReport", "QuantizeReport", "expert_lora_targets", "patch",
           "patched", "quantize_experts", "register", "unpatch", "use_experts_implementation"]
