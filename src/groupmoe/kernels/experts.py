"""The expert MLP forward on the Triton kernels (import only where Triton is installed)."""

from __future__ import annotations

import torch

from ..ops.activations import Activation, GptOssGLU
from ..ops.routing import Routing
from .grouped import combine_rows, gather_grouped_mm, gather_grouped_mm_act


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
    extra = {"alpha": act.alpha, "limit": act.limit} if isinstance(act, GptOssGLU) else {}
    h, a_scaled = gather_grouped_mm_act(x, routing.token_index, w1, routing.offsets, act.name,
                                        bias=b1, row_scale=g, store_h=store_h, **extra)
    y = gather_grouped_mm(a_scaled, None, w2, routing.offsets, bias=b2,
                          bias_scale=g if b2 is not None else None, out_index=routing.order)
    del a_scaled
    return h, combine_rows(y, routing.top_k, None, x.dtype)
