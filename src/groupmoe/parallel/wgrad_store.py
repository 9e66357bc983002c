"""Deferred weight gradients for zero-bubble pipeline schedules (seed 000).

While a :class:`WeightGradStore` is enabled, the *forward* of :func:`~groupmoe.ops.grouped_linear`,
:func:`~groupmoe.ops.expert_mlp` and :func:`linear` (and of modules built on them:
``GroupedExperts``, ``MoEBlock``'s router and shared expert, :class:`WeightGradLinear`) marks
their weights as deferred. Their backward then computes only dX (and the cheap bias /
router-weight gradients) and queues a closure per dW. ``flush()`` closes the current
micro-batch's queue as one group; ``pop()`` runs the oldest group. Each dW is fed to autograd
from the weight the op was given, so views (``w.transpose(-1, -2)`` of a stacked parameter)
are undone, existing ``.grad`` is accumulated into, and tensor hooks and
``register_post_accumulate_grad_hook`` hooks run once, with the gradient, exactly as in eager
backward (the op never had an autograd edge to the parameter, so nothing fires during dX).

With ``torch.distributed.pipelining``: its zero-bubble schedules split backward along autograd
edges, which cannot separate dX from dW inside one fused Function. Build each stage with
``PipelineStage(..., dw_builder=store.dw_builder)`` and enable the store around
``schedule.step(...)``: the input step then runs a full backward (dX plus every non-deferred
gradient), the builder closes that micro-batch's group, and the schedule's weight step runs
exactly that group. Pipelining's metadata passes (``torch.autograd.grad`` for inputs only)
queue nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from ..ops.wgrad import active_store, linear, set_active_store


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Group:
    """One micro-batch's queued dW work (identity-compared, so a runner finds its own)."""

    __slots__ = ("work",)

    def __init__(self, work: list):
        self.work = work


class WeightGradStore:
    """Queue of deferred weight-gradient work, one group per micro-batch.

    Use as a context manager (``with store: ...``) or with :meth:`enable` / :meth:`disable`.
    The store must be enabled during the *forward* of the ops whose dW it defers (that is
    where they detach their weights); their backward may run later. Flushed groups stay
    poppable after the store is disabled. One store is enabled at a time;
    :data:`WEIGHT_GRAD_STORE` is a ready-made one.

    Example (manual split)::

        with WEIGHT_GRAD_STORE:
            loss = model(x).sum()
            loss.backward()             # dX and bias grads now; expert/linear dW queued
            WEIGHT_GRAD_STORE.flush()   # close this micro-batch
        ...                             # e.g. send dX upstream, start the next micro-batch
        WEIGHT_GRAD_STORE.pop()         # dW of the oldest micro-batch, accumulated into .grad

    Not thread-safe: one training loop drives one store. With CUDA streams other than the
    current one, make the stream that pops wait for the backward's stream.
    """

    def __init__(self) -> None:
        self._current: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []
        self._groups: deque[_Group] = deque()

    @property
    def enabled(self) -> bool:
        return active_store() is self

    def enable(self) -> None:
        """Defer the weight gradients of ops whose forward runs from now on to this store."""
        if _in_backward():
            raise RuntimeError("WeightGradStore.enable() called while a backward pass is "
                               "running; enable the store before the forward")
        other = active_store()
        if other is self:
            raise RuntimeError("WeightGradStore is already enabled")
        if other is not None:
            raise RuntimeError("another WeightGradStore is enabled; disable it first")
        set_active_store(self)

    def disable(self) -> None:
        """Stop deferring. Raises if work is queued but not flushed into a group."""
        if _in_backward():
            raise RuntimeError("WeightGradStore.disable() called while a backward pass is "
                               "running")
        if active_store() is not self:
            raise RuntimeError("WeightGradStore.disable(): this store is not enabled")
        if self._current:
            raise RuntimeError(
                f"WeightGradStore.disable() with {len(self._current)} queued weight "
                "gradient(s) not flushed: call flush() after the micro-batch's backward "
                "(then pop())")
        set_active_store(None)

    def __enter__(self) -> WeightGradStore:
        self.enable()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._current:
            # The scope is over either way: leave the store disabled, and drop work that can
            # no longer be attributed to a micro-batch (an error in flight is not masked).
            unflushed = len(self._current)
            self._current = []
            set_active_store(None)
            if exc_type is None:
                raise RuntimeError(
                    f"left a WeightGradStore scope with {unflushed} weight gradient(s) not "
                    "flushed (dropped): call flush() after each micro-batch's backward")
            return
        self.disable()

    def put(self, weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> None:
        """Queue ``compute() -> dW`` for ``weight`` (called by the ops' backward)."""
        self._current.append((weight, compute))

    def flush(self) -> None:
        """Close the current micro-batch: its queued work becomes one group (possibly empty,
        so flush/pop counts always match the schedule's micro-batches)."""
        self._flush()

    def _flush(self) -> _Group:
        group = _Group(self._current)
        self._current = []
        self._groups.append(group)
        return group

    def pop(self) -> None:
        """Run the oldest flushed group: compute each dW and accumulate it like autograd."""
        if not self._groups:
            hint = (f" ({len(self._current)} queued but not flushed: call flush() first)"
                    if self._current else ": flush() a backward pass first")
            raise RuntimeError(f"WeightGradStore.pop() with an empty queue{hint}")
        self._run(self._groups.popleft())

    def pop_all(self) -> None:
        """Run every flushed group, oldest first."""
        while self._groups:
            self.pop()

    def clear(self) -> None:
        """Drop all queued work (flushed or not) without running it."""
        self._current = []
        self._groups.clear()

    def dw_builder(self) -> Callable[[], None]:
        """``PipelineStage(..., dw_builder=store.dw_builder)``: called by the stage right after
        a micro-batch's input backward; closes that group and returns the runner that the
        schedule's weight step calls (it runs exactly that group, in any order)."""
        group = self._flush()

        def run() -> None:
            try:
                self._groups.remove(group)
            except ValueError:
                raise RuntimeError("WeightGradStore: this weight-gradient group has already "
                                   "been run or cleared") from None
            self._run(group)

        return run

    def queued(self) -> int:
        """Weight gradients queued in the current, not yet flushed, group."""
        return len(self._current)

    def pending(self) -> int:
        """Flushed groups not yet popped."""
        return len(self._groups)

    @staticmethod
    def _run(group: _Group) -> None:
        work, group.work = group.work, []
        while work:  # pop as we go so each dW's inputs are freed once it has run
            weight, compute = work.pop(0)
            with torch.no_grad():
                dw = compute()
            torch.autograd.backward(weight, dw)
            del weight, compute, dw


WEIGHT_GRAD_STORE = WeightGradStore()


class WeightGradLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient goes to an enabled :class:`WeightGradStore`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def defer_linear_weight_grads(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` in ``module`` into a :class:`WeightGradLinear` in place
    (same parameters, same output), so a whole model (attention projections too) defers its
    dW with the experts. Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = WeightGradLinear
    return module
