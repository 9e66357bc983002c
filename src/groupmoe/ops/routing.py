"""Routing metadata, dispatch into an expert-sorted buffer, and the weighted combine back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import use_triton
from .checks import check, check_expert_ids, check_id_values, check_same_device, validation_enabled
from .dtypes import to_accum
from .library import custom_op, in_backward


@dataclass(frozen=True)
class Routing:
    """Where every (token, slot) pair goes, sorted stably by expert.

    ``N = tokens * top_k`` flat pairs, indexed ``token * top_k + slot``.
    """

    num_experts: int
    top_k: int
    order: torch.Tensor  # [N] int64: flat pair index of each expert-sorted row
    inverse: torch.Tensor  # [N] int64: sorted row of each flat pair (order's inverse)
    token_index: torch.Tensor  # [N] int64: source token of each sorted row
    expert_index: torch.Tensor  # [N] int64: expert of each sorted row (group ids)
    counts: torch.Tensor  # [E] int64: rows per expert
    offsets: torch.Tensor  # [E] int32: cumulative counts (group ends), grouped_mm's ``offs``

    @property
    def num_tokens(self) -> int:
        return self.order.numel() // max(self.top_k, 1)

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    def tensors(self) -> list[torch.Tensor]:
        """The index tensors in the order custom ops take them (see :meth:`from_tensors`)."""
        return [self.order, self.inverse, self.token_index, self.expert_index, self.counts,
                self.offsets]

    @classmethod
    def from_tensors(cls, tensors, top_k: int) -> Routing:
        """Inverse of :meth:`tensors`."""
        order, inverse, token_index, expert_index, counts, offsets = tensors
        return cls(num_experts=offsets.numel(), top_k=top_k, order=order, inverse=inverse,
                   token_index=token_index, expert_index=expert_index, counts=counts,
                   offsets=offsets)


@custom_op("build_routing")
def _build_routing_op(expert_ids: torch.Tensor, num_experts: int, check_values: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor]:
    if check_values and not in_backward():  # a recomputed forward was checked already
        check_id_values(expert_ids, num_experts, "routing")
    if use_triton(expert_ids):
        from ..kernels.routing import MAX_EXPERTS, routing_metadata

        if num_experts <= MAX_EXPERTS:  # the same tensors, bit for bit, in three launches
            return routing_metadata(expert_ids, num_experts)
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    # a radix sort's passes follow the key's width: int16 keys take a quarter of int64's
    keys = flat.to(torch.int16) if num_experts <= 2 ** 15 else flat
    expert_index, order = torch.sort(keys, stable=True)
    expert_index = expert_index.long()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # scatter_add instead of bincount: no device sync (bincount reads the max back)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    token_index = torch.div(order, top_k, rounding_mode="floor")
    return order, inverse, token_index, expert_index, counts, offsets


@_build_routing_op.register_fake
def _(expert_ids, num_experts, check_values):
    n = expert_ids.numel()
    rows = [expert_ids.new_empty(n, dtype=torch.long) for _ in range(4)]
    return (*rows, expert_ids.new_empty(num_experts, dtype=torch.long),
            expert_ids.new_empty(num_experts, dtype=torch.int32))


def build_routing(expert_ids: torch.Tensor, num_experts: int, *, check_ids: bool = True
                  ) -> Routing:
    """Sort the ``[T, k]`` expert ids by expert (stable) and derive counts, offsets, inverse.

    ``check_ids=False`` skips the range check of the ids' values (and the device sync it costs,
    see :func:`~groupmoe.ops.set_validation`) for ids that are in range by construction, such
    as ``topk`` indices over ``num_experts`` scores; dtype and shape are still checked. One
    custom op (``groupmoe::build_routing``): the range check runs inside it, also when
    compiled, and is not repeated when activation checkpointing recomputes the forward.
    """
    check_expert_ids(expert_ids, num_experts)
    tensors = _build_routing_op(expert_ids, num_experts, check_ids and validation_enabled())
    return Routing.from_tensors(tensors, expert_ids.shape[1])


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def scatter_for_grouped_gemm(
    x: torch.Tensor, routing: Routing, alignment: int = 128
) -> torch.Tensor:
    """Gather token rows into expert-sorted order for a grouped GEMM.

    The buffer has ``round_up(N, alignment)`` rows (``N = T * top_k``): rows ``[0, N)`` hold
    ``x[token_index]``; the tail rows are zero, so a kernel that reads whole tiles past the last
    group never sees garbage. Offsets are unchanged (the tail belongs to no expert).
    """
    check(x.dim() == 2,
          lambda: f"scatter_for_grouped_gemm: x must be [tokens, hidden], got {tuple(x.shape)}")
    check(alignment >= 1, f"scatter_for_grouped_gemm: alignment must be >= 1, got {alignment}")
    check_same_device("scatter_for_grouped_gemm", x=x, token_index=routing.token_index)
    n = routing.num_rows
    rows = round_up(n, alignment)
    out = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
    torch.index_select(x, 0, routing.token_index, out=out[:n])
    out[n:].zero_()
    return out


def combine(
    y: torch.Tensor, routing: Routing, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum expert-sorted rows ``y [N, H]`` back onto their tokens: ``out[t] = sum_s w[t,s] y``.

    Scales by the router weights when given, accumulates in fp32 with ``index_add`` and casts
    once to ``y``'s dtype. Differentiable in ``y`` and ``weights``.
    """
    check(y.dim() == 2 and y.shape[0] == routing.num_rows,
          lambda: f"combine: y must be [{routing.num_rows}, hidden], got {tuple(y.shape)}")
    src = to_accum(y)
    if weights is not None:
        check(weights.shape == (routing.num_tokens, routing.top_k),
              lambda: f"combine: weights must be [{routing.num_tokens}, {routing.top_k}], "
              f"got {tuple(weights.shape)}")
        src = src * weights.reshape(-1)[routing.order].to(src.dtype).unsqueeze(1)
    out = torch.zeros(routing.num_tokens, y.shape[1], dtype=src.dtype, device=y.device)
    return out.index_add(0, routing.token_index, src).to(y.dtype)
