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
    if torch.compiler.is_compiling():
        return
    if type(t) is torch.Tensor and not torch._C._autograd._get_current_graph_task_keep_graph():
        t.untyped_storage().resize_(0)


def _layout(args: tuple) -> tuple[int, ...]:
    # per argument: -1, or the length of a (non-empty) list of tensors, which is flattened
    return tuple(len(a) if isinstance(a, (list, tuple)) and a and
                 all(isinstance(t, torch.Tensor) for t in a) else -1 for a in args)


def _flatten(layout: tuple[int, ...], args) -> list:
    flat: list = []
    for n, a in zip(layout, args):
        if n < 0:
            flat.append(a)
        else:
            flat.extend(a if a is not None else [None] * n)
    return flat


def _unflatten(layout: tuple[int, ...], flat) -> list:
    args, i = [], 0
    for n in layout:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


def needs_input_grad(ctx) -> list:
    """In a :func:`differentiable` op's backward: per argument of the op, whether it needs a
    gradient (a list of bools for a list of tensors)."""
    return _unflatten(ctx.layout, ctx.needs_input_grad[1:])


def differentiable(op, backward, setup_context):
    """``op`` (a :func:`custom_op`) as a callable with autograd, through a plain
    ``torch.autograd.Function`` that calls it: ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` as for ``register_autograd``, except that the backward reads
    :func:`needs_input_grad` (``ctx``'s own follows the flattened arguments); it and the
    returned gradients follow the op's arguments, a list of tensors as a list.

    Why not ``register_autograd``: its wrapper flattens every call's arguments with pytree and
    rebuilds the schema's defaults, ~0.3 ms of host time per call with list arguments, which
    at fine-tuning token counts is a large part of a layer's step. Lists of tensors are
    flattened here by a fixed layout, so their tensors get gradients; torch.compile traces the
    Function as it would register_autograd's (the op stays one opaque node).
    """

    def forward(ctx, layout, *flat):
        args = _unflatten(layout, flat)
        output = op(*args)
        ctx.layout = layout
        # the extra outputs (intermediates kept for backward, absent placeholders) are never
        # used downstream: without this autograd hands backward a zero-filled gradient for
        # each, as large as h, alive for the whole backward
        ctx.set_materialize_grads(False)
        setup_context(ctx, args, output)
        return output

    def backward_flat(ctx, *grads):
        if grads[0] is None:  # the op's result was not used: no input gets a gradient
            return (None,) * (1 + sum(1 if n < 0 else n for n in ctx.layout))
        grads = _flatten(ctx.layout, backward(ctx, *grads))
        return (None, *(d if isinstance(d, torch.Tensor) else None for d in grads))

    name = op._name  # the name without the namespace
    fn = type(f"{name}_autograd", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward_flat)})

    def call(*args):
        layout = _layout(args)
        return fn.apply(layout, *_flatten(layout, args))

    call.__name__ = call.__qualname__ = name
    return call
