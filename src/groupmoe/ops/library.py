"""torch.library plumbing: every op that a forward or backward runs at the traced level is a
custom op, so torch.compile (dynamo and AOTAutograd) sees one opaque node with a fake that
gives its output shapes, and never traces into Python that reads tensors back. Kernels, host
syncs and data checks live inside the ops' implementations, which run eagerly in both modes.

Conventions: custom ops cannot return ``None``, so an output that was not asked for is
:func:`absent` (an empty tensor) and the caller's flags, not its size, say whether it exists.
A routing (:class:`~groupmoe.ops.routing.Routing`) travels as its list of tensors plus
``top_k``; an activation as its :attr:`~groupmoe.ops.activations.Activation.spec` string.
"""

from __future__ import annotations

import torch

NAMESPACE = "groupmoe"


def custom_op(name: str):
    """Decorator: register a function as ``torch.ops.groupmoe.<name>`` (no mutated inputs)."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not asked for."""
    return like.new_empty(0)


def in_backward() -> bool:
    """Whether a backward pass is running (e.g. activation checkpointing recomputes a forward),
    so data checks that already ran in the forward are not repeated."""
    return torch._C._current_graph_task_id() != -1


def release_saved(t: torch.Tensor) -> None:
    """Free the memory of a saved intermediate (one the op made, e.g. ``h``) as soon as backward
    is done with it: an eager autograd node keeps its saved tensors until its backward returns.
    Not when the graph is kept for another backward (``retain_graph``), and not while a
    compiler traces (a compiled backward frees it after its last use by itself)."""
    if type(t) is torch.Tensor and not torch._C._autograd._get_current_graph_task_keep_graph():
        t.untyped_storage().resize_(0)
