"""Input validation shared by every op: clear errors instead of CUDA asserts or silent garbage."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .library import custom_op, in_backward

_VALIDATE = os.environ.get("GROUPMOE_VALIDATE", "1") not in ("0", "false", "False")


def set_validation(enabled: bool) -> None:
    """Turn the data-dependent checks (NaN logits, out-of-range expert ids) on or off.

    Shape, dtype and device checks are always on; the data checks read one scalar back from
    the device per layer, so throughput-critical runs that already trust their inputs may
    switch them off (also via ``GROUPMOE_VALIDATE=0``).
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    """Whether the data-dependent checks (one device read per layer) run; see
    :func:`set_validation`."""
    return _VALIDATE


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


def _raise_if_not_finite(logits: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(logits)
    if logits.numel() and bool(bad.any()):  # one device sync
        idx = bad.nonzero()
        tokens = idx[:, 0].unique()
        raise FloatingPointError(
            f"{where}: router logits hold NaN/Inf in {tokens.numel()} of {logits.shape[0]} "
            f"tokens (first at token {int(idx[0, 0])}, expert {int(idx[0, 1])}); "
            "check the layer's input for overflow"
        )


@custom_op("check_finite_logits")
def _finite_ids_op(logits: torch.Tensor, expert_ids: torch.Tensor, where: str) -> torch.Tensor:
    if not in_backward():  # a recomputed forward was checked already
        _raise_if_not_finite(logits, where)
    return expert_ids.clone()  # an output the routing consumes keeps the check in the graph


@_finite_ids_op.register_fake
def _(logits, expert_ids, where):
    return torch.empty_like(expert_ids)


def checked_ids(logits: torch.Tensor, expert_ids: torch.Tensor, where: str = "router"
                ) -> torch.Tensor:
    """``expert_ids`` once ``logits`` are known finite; raises with the first offending token
    when they hold NaN or Inf. With validation off, ``expert_ids`` unchanged and no check.

    The check is a custom op that passes the ids through, so it stays in a compiled graph and
    raises the same error there; activation checkpointing's recompute does not repeat it.
    """
    if not _VALIDATE:
        return expert_ids
    return _finite_ids_op(logits.detach(), expert_ids, where)
