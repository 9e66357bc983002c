"""Scaling out: deferred weight gradients (zero-bubble pipelines), expert parallelism.

``expert_parallel`` is imported on first use (it needs ``torch.distributed``), and
``shard_experts`` (expert parallel inside a transformers model) with transformers.
"""

from .wgrad_store import (
    WEIGHT_GRAD_STORE,
    WeightGradLinear,
    WeightGradStore,
    defer_linear_weight_grads,
    linear,
)

_LAZY = ("ExpertParallel", "local_expert_range", "resolve_group", "shard_expert_tensor")
_LAZY_TRANSFORMERS = ("shard_experts",)
__all__ = ["WEIGHT_GRAD_STORE", "WeightGradLinear", "WeightGradStore",
           "defer_linear_weight_grads", "linear", *_LAZY, *_LAZY_TRANSFORMERS]


def __getattr__(name):
    if name in _LAZY:
        from . import expert_parallel

        return getattr(expert_parallel, name)
    if name in _LAZY_TRANSFORMERS:
        from . import transformers_ep

        return getattr(transformers_ep, name)
    raise AttributeError(name)
