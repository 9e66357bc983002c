"""Scaling out: deferred weight gradients (zero-bubble pipelines), expert parallelism.

``expert_parallel`` is imported on first use: it builds on :mod:`groupmoe.ops`, which itself
imports the weight-gradient store from here.
"""

from .wgrad_store import WEIGHT_GRAD_STORE, WeightGradStore, linear, weight_grad

_LAZY = ("ExpertParallel", "local_expert_range", "resolve_group", "shard_expert_tensor")
__all__ = ["WEIGHT_GRAD_STORE", "WeightGradStore", "linear", "weight_grad", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from . import expert_parallel

        return getattr(expert_parallel, name)
    raise AttributeError(name)
