"""Scaling out: deferred weight gradients (zero-bubble pipelines), expert parallelism.

``expert_parallel`` is imported on first use: it builds on :mod:`groupmoe.ops`, which itself
imports the weight-gradient store from here.
"""

from .wgrad_store import WEIGHT_GRAD_STORE, WeightGradStore, linear, weight_grad

__all__ = ["WEIGHT_GRAD_STORE", "ExpertParallel", "WeightGradStore", "linear", "weight_grad"]


def __getattr__(name):
    if name == "ExpertParallel":
        from .expert_parallel import ExpertParallel

        return ExpertParallel
    raise AttributeError(name)
