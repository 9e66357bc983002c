"""LoRA on experts, grouped (and peft interop)."""

from .chunked import chunked_expert_mlp
from .experts import ExpertLoRAModule, expert_mlp_lora
from .factors import ExpertLoRA, LoRAFactors, concat_outputs
from .peft import lora_factors_from_linears, lora_from_peft_param_wrapper, unwrap_param_wrappers

__all__ = ["ExpertLoRA", "ExpertLoRAModule", "LoRAFactors", "chunked_expert_mlp",
           "concat_outputs", "expert_mlp_lora", "lora_factors_from_linears",
           "lora_from_peft_param_wrapper", "unwrap_param_wrappers"]
