"""Input validation shared by every op: clear errors instead of CUDA asserts or silent garbage."""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .library import custom_op, in_backward

Validation = bool | Literal["sync"]


def _mode_from_env(value: str) -> Validation:
    if value in ("0", "false", "False"):
        return False
    return "sync" if value == "sync" else True


_VALIDATE: Validation = _mode_from_env(os.environ.get("GROUPMOE_VALIDATE", "1"))


def set_validation(enabled: Validation) -> None:
    """Turn the data-dependent checks (NaN/Inf router logits, out-of-range expert ids) on or
    off, or make them wait for the device.

    Shape, dtype and device checks are always on. ``True`` (default): on CUDA the logits check
    runs on the device and its result is read back without waiting, so it costs no host sync;
    a failure raises ``FloatingPointError`` at a later check (usually the next layer's) or at
    :func:`flush_checks`, naming the layer and token as before. On CPU it raises at once.
    ``"sync"``: every check waits for its result and raises in the layer that failed (one
    device sync per layer). ``False``: no data checks. Also ``GROUPMOE_VALIDATE=0|1|sync``.
    The range check of caller-given expert ids always waits (a bad id would fault the
    kernels that follow).
    """
    global _VALIDATE
    if enabled not in (True, False, "sync"):
        raise ValueError(f"set_validation: expected True, False or 'sync', got {enabled!r}")
    _VALIDATE = enabled


def validation_enabled() -> bool:
    """Whether the data-dependent checks run; see :func:`set_validation`."""
    return bool(_VALIDATE)


def check(cond: bool, msg: str | Callable[[], str]) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``. Pass messages that format sizes as a
    ``lambda``: formatting a size while torch.compile traces would specialise the graph on it
    (a recompile per token count), so the message is made only when the check fails."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_same_device(where: str, **tensors: torch.Tensor | None) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{where}: tensors must share one device, got {desc}")


def check_same_dtype(where: str, **tensors: torch.Tensor | None) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    dtypes = {k: t.dtype for k, t in present.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{k}={d}" for k, d in dtypes.items())
        raise ValueError(f"{where}: tensors must share one dtype, got {desc}")


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int, where: str = "routing",
                     values: bool = False) -> None:
    """dtype and shape; the values' range too (one device sync) when ``values`` and
    validation is on (eager callers; :func:`~groupmoe.ops.build_routing` checks them inside
    its custom op)."""
    check(
        expert_ids.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8),
        f"{where}: expert ids must be an integer tensor, got {expert_ids.dtype}",
    )
    check(expert_ids.dim() == 2, lambda: f"{where}: expert ids must be [tokens, top_k], got "
          f"shape {tuple(expert_ids.shape)}")
    check(num_experts >= 1, f"{where}: num_experts must be >= 1, got {num_experts}")
    if values and _VALIDATE:
        check_id_values(expert_ids, num_experts, where)


def check_id_values(expert_ids: torch.Tensor, num_experts: int, where: str) -> None:
    """Raise naming the first expert id outside ``[0, num_experts)`` (one device sync)."""
    if expert_ids.numel():
        lo, hi = torch.stack(torch.aminmax(expert_ids)).tolist()  # one device sync
        if lo < 0 or hi >= num_experts:
            bad = ((expert_ids < 0) | (expert_ids >= num_experts)).nonzero()[0].tolist()
            raise ValueError(
                f"{where}: expert id out of range [0, {num_experts}): ids span [{lo}, {hi}], "
                f"first bad entry at (token, slot) = {tuple(bad)}"
            )


def _raise_if_not_finite(logits: torch.Tensor, where: str, late: bool = False) -> None:
    bad = ~torch.isfinite(logits)
    if logits.numel() and bool(bad.any()):  # one device sync
        idx = bad.nonzero()
        tokens = idx[:, 0].unique()
        raise FloatingPointError(
            f"{where}: router logits hold NaN/Inf in {tokens.numel()} of {logits.shape[0]} "
            f"tokens (first at token {int(idx[0, 0])}, expert {int(idx[0, 1])}); "
            "check the layer's input for overflow"
            + ("; found after the layer ran, as the check reads its result back without "
               "waiting (GROUPMOE_VALIDATE=sync raises inside the layer)" if late else "")
        )


@dataclass
class _PendingCheck:
    """A logits check running on the device: ``peak`` (a slot of pinned host memory) receives
    the largest ``|logit|``, NaN or Inf when one is not finite, once ``done`` has passed."""

    logits: torch.Tensor  # kept to name the first bad token if the check fails
    where: str
    peak: torch.Tensor
    done: torch.cuda.Event


@dataclass
class _Slots:
    """Per device: pinned host slots and events for the checks in flight, reused in turn (no
    pinned allocation or event creation per check)."""

    peaks: torch.Tensor
    events: list
    next: int = 0


_SLOTS_PER_DEVICE = 1024
_PENDING: deque[_PendingCheck] = deque()
_SLOTS: dict[torch.device, _Slots] = {}
_WARNED_CAPTURE = False


def _defer_finite_check(logits: torch.Tensor, where: str) -> None:
    global _WARNED_CAPTURE
    if torch.cuda.is_current_stream_capturing():  # no host read-back inside a CUDA graph
        if not _WARNED_CAPTURE:
            warnings.warn("groupmoe: the NaN/Inf check of router logits is skipped while a "
                          "CUDA graph is captured", stacklevel=4)
            _WARNED_CAPTURE = True
        return
    _resolve_pending(wait=len(_PENDING) >= _SLOTS_PER_DEVICE)  # frees the slot taken next
    slots = _SLOTS.get(logits.device)
    if slots is None:
        slots = _SLOTS[logits.device] = _Slots(
            torch.empty(_SLOTS_PER_DEVICE, pin_memory=True),
            [torch.cuda.Event() for _ in range(_SLOTS_PER_DEVICE)])
    i, slots.next = slots.next, (slots.next + 1) % _SLOTS_PER_DEVICE
    # one reduction kernel: max |x| is NaN or Inf exactly when some logit is not finite
    peak = slots.peaks[i]
    peak.copy_(torch.linalg.vector_norm(logits, ord=math.inf, dtype=torch.float32),
               non_blocking=True)
    done = slots.events[i]
    done.record(torch.cuda.current_stream(logits.device))
    _PENDING.append(_PendingCheck(logits, where, peak, done))


def _resolve_pending(wait: bool) -> None:
    """Raise for the first finished check that failed; ``wait`` for the unfinished ones."""
    while _PENDING:
        check_ = _PENDING[0]
        if wait:
            check_.done.synchronize()
        elif not check_.done.query():
            return
        _PENDING.popleft()
        if not math.isfinite(float(check_.peak)):
            _PENDING.clear()  # later layers saw the NaN that this one produced
            _raise_if_not_finite(check_.logits, check_.where, late=True)


def flush_checks() -> None:
    """Wait for the data checks still running on the device and raise the first that failed
    (``FloatingPointError`` naming the layer and token). Checks finish on their own at later
    checks; call this where a failure must surface, e.g. at the end of a training step."""
    _resolve_pending(wait=True)


def _check_finite(logits: torch.Tensor, where: str) -> None:
    if in_backward():  # a recomputed forward was checked already
        return
    if logits.is_cuda and _VALIDATE is True and logits.numel():
        _resolve_pending(wait=False)
        _defer_finite_check(logits, where)
    else:
        _raise_if_not_finite(logits, where)


@custom_op("check_finite_logits")
def _finite_ids_op(logits: torch.Tensor, expert_ids: torch.Tensor, where: str) -> torch.Tensor:
    _check_finite(logits, where)
    return expert_ids.clone()  # an output the routing consumes keeps the check in the graph


@_finite_ids_op.register_fake
def _(logits, expert_ids, where):
    return torch.empty_like(expert_ids)


def checked_ids(logits: torch.Tensor, expert_ids: torch.Tensor, where: str = "router"
                ) -> torch.Tensor:
    """``expert_ids`` once ``logits`` are checked finite; raises with the first offending token
    when they hold NaN or Inf (on CUDA by default at a later check or :func:`flush_checks`,
    see :func:`set_validation`). With validation off, ``expert_ids`` unchanged and no check.

    Compiled, the check is a custom op that passes the ids through, so it stays in the graph
    and raises the same error there; activation checkpointing's recompute does not repeat it.
    """
    if not _VALIDATE:
        return expert_ids
    if torch.compiler.is_compiling():
        return _finite_ids_op(logits.detach(), expert_ids, where)
    _check_finite(logits.detach(), where)  # eager: no custom-op dispatch (host time)
    return expert_ids
