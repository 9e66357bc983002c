"""Pure functions and custom ops: the math of groupmoe lives here, once."""

from .activations import (
    ACTIVATIONS,
    Activation,
    GptOssGLU,
    SwiGLU,
    activation_from_spec,
    gated_act,
    get_activation,
)
from .backend import get_backend, set_backend
from .checkpoint import checkpoint_context
from .checks import checked_ids, flush_checks, set_validation, validation_enabled
from .experts import bias_prob_grads, expert_mlp, expert_mlp_naive, gather_sum
from .grouped_gemm import grouped_mm, grouped_mm_wgrad, native_available, segment_sum
from .grouped_linear import grouped_linear
from .reference import expert_mlp_reference
from .router import route
from .routing import Routing, build_routing, combine, scatter_for_grouped_gemm

__all__ = [
    "ACTIVATIONS", "Activation", "GptOssGLU", "Routing", "SwiGLU", "activation_from_spec",
    "bias_prob_grads", "build_routing", "checked_ids", "checkpoint_context", "combine",
    "expert_mlp", "expert_mlp_naive", "expert_mlp_reference", "flush_checks", "gated_act",
    "gather_sum",
    "get_activation", "get_backend", "grouped_linear", "grouped_mm", "grouped_mm_wgrad",
    "native_available", "route", "scatter_for_grouped_gemm", "segment_sum", "set_backend",
    "set_validation", "validation_enabled",
]
