"""groupmoe: fast, memory-lean Mixture-of-Experts training with grouped GEMM."""

from . import nn, ops
from .nn import GroupedExperts, MoEBlock, TopKRouter
from .ops import build_routing, expert_mlp, route, set_validation

__version__ = "0.1.0"

__all__ = [
    "GroupedExperts", "MoEBlock", "TopKRouter", "build_routing", "expert_mlp", "nn", "ops",
    "route", "set_validation", "__version__",
]
