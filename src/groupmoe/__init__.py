"""groupmoe: fast, memory-lean Mixture-of-Experts training with grouped GEMM."""

from . import nn, ops
from .nn import GroupedExperts, MoEBlock, TopKRouter
from .ops import build_routing, expert_mlp, flush_checks, route, set_validation


def patch(model, precision: str = "default"):
    """Accelerate a transformers MoE model in place; see :func:`groupmoe.integrations.patch`."""
    from .integrations.transformers import patch as _patch

    return _patch(model, precision)


def unpatch(model) -> None:
    """Undo :func:`patch`."""
    from .integrations.transformers import unpatch as _unpatch

    _unpatch(model)


def patched(model):
    """Context manager: ``with groupmoe.patched(model) as report: ...``."""
    from .integrations.transformers import patched as _patched

    return _patched(model)

def quantize_experts(model, **options):
    """Convert a transformers 5 MoE model's expert stacks to NF4 in place; ``options`` and the
    report: :func:`groupmoe.integrations.quantize_experts`."""
    from .integrations.quantized import quantize_experts as _quantize

    return _quantize(model, **options)


__version__ = "0.1.0"

__all__ = [
    "GroupedExperts", "MoEBlock", "TopKRouter", "build_routing", "expert_mlp", "flush_checks",
    "nn", "ops",
    "patch", "patched", "quantize_experts", "route", "set_validation", "unpatch", "__version__",
]
