"""LoRA on experts, grouped (and peft interop)."""

from .experts import ExpertLoRA, ExpertLoRAModule, LoRAFactors, concat_outputs, expert_mlp_lora
from .peft import lora_factors_from_linears, lora_from_peft_param_wrapper, unwrap_param_wrappers

__all__ = ["ExpertLoRA", "ExpertLoRAModule", "LoRAFactors", "concat_outputs", "expert_mlp_lora",
           "lora_factors_from_linears", "lora_from_peft_param_wrapper", "unwrap_param_wrappers"]
