"""Scaling out: deferred weight gradients (zero-bubble pipelines), expert parallelism.

``expert_parallel`` is imported on first use (it needs ``torch.distributed``).
"""

from .wgrad_store import (
    WEIGHT_GRAD_STORE,
    WeightGradLinear,
    WeightGradStore,
    defer_linear_weight_grads,
    linear,
)

_LAZY = ("ExpertParallel", "local_expert_range", "resolve_group", "shard_expert_tensor")
__all__ = ["WEIGHT_GRAD_STORE", "WeightGradLinear", "WeightGradStore",
           "defer_linear_weight_grads", "linear", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from . import expert_parallel

        return getattr(expert_parallel, name)
    raise AttributeError(name)
