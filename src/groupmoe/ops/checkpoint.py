"""Selective activation checkpointing for groupmoe's ops.

Plain activation checkpointing runs every op of a layer twice: in the forward and again when
backward recomputes it. For an MoE layer part of that is cheap to keep instead: the routing
metadata (a few int64 vectors of ``T * k``) costs a sort and a dozen small kernels to rebuild,
and at fine-tuning token counts each of those kernels costs more host time than GPU time.
:func:`checkpoint_context` gives ``torch.utils.checkpoint`` a policy (torch's selective
checkpointing) that keeps the outputs of chosen groupmoe ops from the forward, so the
recomputation reuses them; everything else is recomputed as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .checks import check
from .library import NAMESPACE

# what can be kept -> the custom ops whose outputs are kept
KEEPABLE = {
    # sorted order, inverse, token and expert index, counts, offsets: 6 x [T*k] int64 at most
    "routing": ("build_routing",),
    # the expert MLP's output [T, H] and its gate_up output h [T*k, 2I] (when the op saves it):
    # the recomputation skips the experts' forward (and, for 4-bit experts, one dequantization
    # of every stack), for that memory per layer until its backward
    "experts": ("expert_mlp", "chunked_expert_mlp"),
}


def _op_names(keep: Iterable[str]) -> frozenset[str]:
    names = []
    for what in keep:
        check(what in KEEPABLE,
              f"checkpoint_context: cannot keep {what!r}; choose from {sorted(KEEPABLE)}")
        names += [f"{NAMESPACE}::{n}" for n in KEEPABLE[what]]
    return frozenset(names)


def _policy(kept: frozenset[str], ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # by name: some of the ops are registered by modules that import this one's package
    if getattr(op, "namespace", None) == NAMESPACE and op.name() in kept:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context(keep: Iterable[str] = ("routing",)) -> Callable[[], tuple]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that
    keeps the outputs of groupmoe's ops named by ``keep`` (``"routing"``, ``"experts"``; see
    :data:`KEEPABLE`) instead of recomputing them. With transformers::

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": groupmoe.ops.checkpoint_context()})

    Results are identical to plain checkpointing (the kept outputs are the forward's own).
    """
    kept = _op_names(tuple(keep))
    return functools.partial(create_selective_checkpoint_contexts,
                             functools.partial(_policy, kept))
