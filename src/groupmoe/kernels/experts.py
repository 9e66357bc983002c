"""The expert MLP forward and backward on the Triton kernels (import only where Triton is
installed); :class:`~groupmoe.ops.experts.ExpertMLPFunction` composes them."""

from __future__ import annotations

import torch

from ..ops.activations import Activation
from ..ops.routing import Routing
from .grouped import combine_rows, gather_grouped_mm, gather_grouped_mm_act
from .grouped_bwd import down_dx_act, grouped_wgrad

__all__ = ["down_backward", "expert_forward", "gate_up", "grouped_wgrad", "input_grad_rows",
           "sum_slots"]


def expert_forward(
    x: torch.Tensor, g: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    b1: torch.Tensor | None, b2: torch.Tensor | None, routing: Routing, act: Activation,
    store_h: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(h, out)`` of :class:`~groupmoe.ops.experts.ExpertMLPFunction`'s forward.

    ``g`` holds the router weights in expert-sorted row order. Three launches: gate_up GEMM
    gathering ``x`` rows with bias + activation + ``g`` scale in its epilogue; down GEMM adding
    ``g * b_down`` and storing each row at its (token, slot) position; the k-slot sum.
    """
    extra = {"alpha": act.alpha, "limit": act.gate_limit} if act.name == "gptoss" else {}
    h, a_scaled = gather_grouped_mm_act(x, routing.token_index, w1, routing.offsets, act.name,
                                        bias=b1, row_scale=g, store_h=store_h, **extra)
    y = gather_grouped_mm(a_scaled, None, w2, routing.offsets, bias=b2,
                          bias_scale=g if b2 is not None else None, out_index=routing.order)
    del a_scaled
    return h, combine_rows(y, routing.top_k, None, x.dtype)


def gate_up(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, routing: Routing
            ) -> torch.Tensor:
    """``h = x[token_index] @ w1[e] + b1[e]`` (backward's recompute under ``save="none"``)."""
    return gather_grouped_mm(x, routing.token_index, w1, routing.offsets, bias=b1)


def down_backward(dout: torch.Tensor, h: torch.Tensor, g: torch.Tensor, w2: torch.Tensor,
                  routing: Routing, act: Activation, want_a_scaled: bool, want_dg: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dh, g * act(h), dg)`` from the ``[T, H]`` output gradient in one launch (plus the
    deterministic sum of ``dg``'s per-tile partials): see :func:`down_dx_act`."""
    return down_dx_act(dout, routing.token_index, w2, routing.offsets, h, g, act,
                       want_a_scaled=want_a_scaled, want_dg=want_dg)


def input_grad_rows(dh: torch.Tensor, w1: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``dh @ w1[e]^T`` with each row stored at its (token, slot) position ``[T*k, H]``, for
    :func:`sum_slots`."""
    return gather_grouped_mm(dh, None, w1.transpose(-1, -2), routing.offsets,
                             out_index=routing.order)


def sum_slots(rows: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]``: the k slot rows of each token (in (token, slot) order) summed in fp32
    registers, cast once (deterministic)."""
    return combine_rows(rows, routing.top_k, None, dtype)
