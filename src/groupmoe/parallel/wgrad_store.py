"""Deferred weight gradients for zero-bubble pipeline schedules (seed 000).

While a :class:`WeightGradStore` is enabled, groupmoe's autograd Functions (the grouped
linear, the fused expert MLP and :func:`linear`) compute only the input gradients in backward
and queue a closure per weight gradient. ``flush()`` closes the current micro-batch's group;
``pop()`` runs the oldest group and accumulates each gradient into the parameter's ``.grad``
through autograd itself, so accumulation over micro-batches, existing ``.grad``, views of
parameters (``w.transpose(...)``) and parameter hooks behave as in eager backward. Bias
gradients stay eager (cheap). Disabled, nothing changes.

Known limit: torch still calls a deferred parameter's hooks during the dX half, with
``None`` (as for any Function that returns ``None`` for it), before calling them again with
the gradient at ``pop()``; a tensor hook must therefore accept ``None`` (``register_hook(lambda
g: g * 2)`` fails), and post-accumulate hooks run once more than in eager backward.

With ``torch.distributed.pipelining``: its zero-bubble schedules split backward along autograd
edges, which cannot separate dX from dW inside one custom Function, but a stage built with
``PipelineStage(..., dw_builder=WEIGHT_GRAD_STORE.dw_builder)`` runs each micro-batch's
backward whole and calls the builder's runner in the schedule's weight step: enable the store
around ``schedule.step(...)`` and groupmoe's dW work lands in those steps.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch


class WeightGradStore:
    """A FIFO of per-micro-batch groups of weight-gradient closures."""

    def __init__(self) -> None:
        self._enabled = False
        self._current: list[Callable[[], None]] = []
        self._groups: collections.deque[list[Callable[[], None]]] = collections.deque()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        if torch._C._current_autograd_node() is not None:
            raise RuntimeError("WeightGradStore.enable() called while a backward pass is "
                               "running; enable it before backward starts")
        self._enabled = True

    def disable(self) -> None:
        if self._current:
            raise RuntimeError(f"WeightGradStore.disable() with {len(self._current)} queued "
                               "weight gradient(s) not flushed; call flush() (and pop()) first")
        self._enabled = False

    def __enter__(self) -> WeightGradStore:
        self.enable()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave cleanly on errors; the queued work is dropped
            self._current.clear()
            self._enabled = False
            return
        self.disable()

    def defer(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        """Queue ``compute()`` (the gradient of ``weight``, a Function input) for later."""

        def run() -> None:
            with torch.no_grad():
                grad = compute()
            torch.autograd.backward([weight], [grad], retain_graph=True)

        self._current.append(run)

    def flush(self) -> None:
        """Close the current micro-batch: its queued gradients become one group."""
        self._groups.append(self._current)
        self._current = []

    def pop(self) -> None:
        """Run the oldest flushed group (accumulating into ``.grad``)."""
        if not self._groups:
            raise RuntimeError("WeightGradStore.pop() with an empty queue: flush() a backward "
                               "pass first")
        for run in self._groups.popleft():
            run()

    def dw_builder(self) -> Callable[[], None]:
        """``torch.distributed.pipelining`` hook: ``PipelineStage(..., dw_builder=
        store.dw_builder)``. The stage calls it right after a micro-batch's backward (run with
        the store enabled); it closes that micro-batch's group and returns the runner the
        schedule calls in its weight step (W of zero-bubble schedules)."""
        group, self._current = self._current, []

        def run() -> None:
            for work in group:
                work()

        return run

    def queued(self) -> int:
        """Weight gradients queued in the current, not yet flushed, group."""
        return len(self._current)

    def pending(self) -> int:
        """Flushed groups not yet popped."""
        return len(self._groups)


WEIGHT_GRAD_STORE = WeightGradStore()


def weight_grad(weight: torch.Tensor, compute: Callable[[], torch.Tensor]):
    """``compute()`` now, or ``None`` with the work queued when the store is enabled."""
    if WEIGHT_GRAD_STORE.enabled:
        WEIGHT_GRAD_STORE.defer(weight, compute)
        return None
    return compute()


class LinearFunction(torch.autograd.Function):
    """``x W^T (+ b)`` whose weight gradient the store can defer (bias gradient eager)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            dw = weight_grad(weight, lambda: (dy2.t() @ x2).to(weight.dtype))
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] \
            else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear`` that participates in the :data:`WEIGHT_GRAD_STORE` (for routers, shared
    experts and the rest of a block)."""
    return LinearFunction.apply(x, weight, bias)
