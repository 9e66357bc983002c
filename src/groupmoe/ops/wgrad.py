"""The hook by which ops defer weight gradients to an active weight-gradient store.

A store (:class:`groupmoe.parallel.WeightGradStore`) sets itself active here; the op wrappers
(:func:`grouped_linear`, :func:`expert_mlp`, :func:`linear`) call :func:`defer` on each weight
in forward. With no active store (or no grad needed) it returns the weight unchanged and the op
is exactly the eager one. With a store, the Function gets a detached alias of ``w`` (so autograd
has no edge to the parameter: its hooks do not fire with an empty gradient in backward) plus a
:class:`DeferredWeight` that remembers the real weight; backward then computes dX and hands the
dW computation to the store, which later runs it and feeds the result through autograd from the
real weight (view inverse, ``.grad`` accumulation and hooks exactly as eager).

This module depends on torch and :mod:`.stacks` only, so ops never import
:mod:`groupmoe.parallel`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .stacks import split_grad


class _Store(Protocol):
    def put(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None: ...


_active: _Store | None = None


def set_active_store(store: _Store | None) -> None:
    """Make ``store`` the target of deferred weight gradients (``None``: eager)."""
    global _active
    _active = store


def active_store() -> _Store | None:
    return _active


class DeferredWeight:
    """A weight whose gradient goes to ``store`` instead of through the autograd edge;
    ``node`` is the autograd node of the alias the op got in its place."""

    __slots__ = ("node", "store", "weight")

    def __init__(self, weight: torch.Tensor, store: _Store, node):
        self.weight, self.store, self.node = weight, store, node


def defer(w: torch.Tensor | None) -> tuple[torch.Tensor | None, DeferredWeight | None]:
    """``(w, None)`` when no store is active (the one cheap check), else
    ``(alias, DeferredWeight(w, store))`` for a weight that needs a gradient.

    ``alias`` is a view of a fresh leaf sharing ``w``'s data: the op's output still requires
    grad when nothing else does, and the gradient edge ends at this throwaway leaf (the
    Function returns ``None`` for it), not at the parameter whose hooks would fire with an
    empty gradient. The alias's own node tells backward whether this pass wants the weight's
    gradient at all (not in ``torch.autograd.grad(out, inputs)``).
    """
    if w is None:
        return None, None
    aliases, deferred = defer_stack([w])
    return aliases[0], deferred


def defer_stack(ws: list[torch.Tensor]) -> tuple[list[torch.Tensor], DeferredWeight | None]:
    """:func:`defer` for a weight stack in the ops' list form (:mod:`groupmoe.ops.stacks`):
    one :class:`DeferredWeight` for all its tensors, found again by :func:`deferred_of`."""
    store = _active
    if store is None or not torch.is_grad_enabled() or not any(w.requires_grad for w in ws):
        return ws, None
    if torch.compiler.is_compiling():
        raise RuntimeError("WeightGradStore: deferred weight gradients run in eager mode only; "
                           "disable the store around compiled code")
    aliases = [(leaf := w.detach().requires_grad_(w.requires_grad)).view_as(leaf) for w in ws]
    trained = tuple(w for w in ws if w.requires_grad)
    deferred = DeferredWeight(trained[0] if len(ws) == 1 else trained, store,
                              next(a.grad_fn for a in aliases if a.grad_fn is not None))
    aliases[0]._groupmoe_deferred = deferred
    return aliases, deferred


def deferred_of(ws) -> DeferredWeight | None:
    """The :class:`DeferredWeight` of a stack made by :func:`defer_stack` (``None`` for any
    other, and for the fake tensors a compiler traces with)."""
    return getattr(ws[0], "_groupmoe_deferred", None)


def weight_grad(deferred: DeferredWeight | None, needed: bool,
                fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor | None:
    """In a Function's backward: ``fn(*args)`` now (``needed``), queued to the store
    (``deferred``; the Function then returns ``None`` for the detached weight), or nothing
    (not ``needed``).

    Work is queued only when this backward pass would have accumulated into the weight:
    ``torch.autograd.grad(out, [x])`` or ``backward(inputs=...)`` without the weight skip it.
    ``args`` are bound now, so the caller may drop its own references to them.
    """
    if not needed:
        return None
    if deferred is not None:
        if torch._C._will_engine_execute_node(deferred.node):
            deferred.store.put(deferred.weight, partial(fn, *args))
        return None
    return fn(*args)


def stack_weight_grad(deferred: DeferredWeight | None, needed: bool, ws: list[torch.Tensor],
                      fn: Callable[..., torch.Tensor], *args: Any) -> list | None:
    """:func:`weight_grad` for a stack in list form: ``fn(*args)`` is the gradient of the
    assembled stack; returns (or queues) one gradient per list entry."""
    if deferred is not None:  # the store gets the trained entries' gradients
        return weight_grad(deferred, needed, _trained_grads, ws, fn, args)
    dw = weight_grad(None, needed, fn, *args)
    return None if dw is None else split_grad(dw, ws)


def _trained_grads(ws, fn, args):
    grads = split_grad(fn(*args), ws)
    if len(ws) == 1:
        return grads[0]
    return tuple(g for g, w in zip(grads, ws) if w.requires_grad)


def _linear_wgrad(x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(dtype)


class LinearFunction(torch.autograd.Function):
    """``y = x w^T + b`` (``nn.Linear`` layout ``w [out, in]``) whose weight gradient can be
    deferred; the bias gradient is always eager."""

    @staticmethod
    def forward(ctx, x, w, b, deferred: DeferredWeight | None = None):
        ctx.deferred = deferred
        ctx.has_bias = b is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dy @ w if need_x else None
        dw = weight_grad(ctx.deferred, need_w, _linear_wgrad, x, dy, w.dtype)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear`` whose weight gradient goes to an active weight-gradient store (so a router
    gate or shared expert can defer its dW too); plain ``F.linear`` when none is active."""
    w, deferred = defer(weight)
    if deferred is None:
        return F.linear(x, weight, bias)
    return LinearFunction.apply(x, w, bias, deferred)
