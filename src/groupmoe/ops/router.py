"""Router math: logits -> (top-k weights, expert ids), per model family."""

from __future__ import annotations

from typing import Literal

import torch

from .backend import use_triton
from .checks import check, checked_ids
from .library import custom_op, differentiable

RouterKind = Literal["softmax_topk", "topk_softmax"]
ROUTER_KINDS = ("softmax_topk", "topk_softmax")


@custom_op("route_topk")
def _route_op(logits: torch.Tensor, top_k: int, softmax_first: bool, normalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.router import route_forward

    return route_forward(logits, top_k, softmax_first, normalize)


@_route_op.register_fake
def _(logits, top_k, softmax_first, normalize):
    t = logits.shape[0]
    return logits.new_empty(t, top_k), logits.new_empty(t, top_k, dtype=torch.long)


@custom_op("route_topk_backward")
def _route_backward_op(dweights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                       softmax_first: bool, normalize: bool) -> torch.Tensor:
    from ..kernels.router import route_backward

    return route_backward(dweights, logits, ids, softmax_first, normalize)


@_route_backward_op.register_fake
def _(dweights, logits, ids, softmax_first, normalize):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, _, ctx.softmax_first, ctx.normalize = inputs
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, dweights, _):
    logits, ids = ctx.saved_tensors
    return (_route_backward_op(dweights, logits, ids, ctx.softmax_first, ctx.normalize),
            None, None, None)


_route_fused = differentiable(_route_op, _route_backward, _route_setup)


def _fused(logits: torch.Tensor) -> bool:
    if not use_triton(logits):
        return False
    from ..kernels.router import MAX_EXPERTS

    return logits.shape[1] <= MAX_EXPERTS


def route(
    logits: torch.Tensor,
    top_k: int,
    kind: RouterKind = "softmax_topk",
    normalize: bool = True,
    where: str = "router",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from ``logits [T, E]``.

    * ``softmax_topk`` (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral): softmax in fp32 over all
      experts, top-k, optionally renormalise the k weights to sum to one, cast back to the
      logits' dtype.
    * ``topk_softmax`` (gpt-oss): top-k on the raw logits, softmax over the k in the logits'
      dtype.

    On CUDA (up to 1024 experts) one Triton kernel forward and one backward
    (:mod:`groupmoe.kernels.router`): the same math in fp32 registers, ties to the lowest
    expert index; torch ops elsewhere (the reference).

    Returns ``(weights [T, k] in logits.dtype, expert ids [T, k] int64)``.
    """
    check(logits.dim() == 2,
          lambda: f"{where}: logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    check(1 <= top_k <= num_experts,
          lambda: f"{where}: top_k={top_k} must be between 1 and the number of experts "
                  f"({num_experts})")
    check(kind in ROUTER_KINDS,
          lambda: f"{where}: unknown router kind {kind!r}; choose softmax_topk or topk_softmax")
    if _fused(logits):
        weights, ids = _route_fused(logits, top_k, kind == "softmax_topk", normalize)
        return weights, checked_ids(logits, ids, where)
    if kind == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), checked_ids(logits, ids, where)
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=top.dtype), checked_ids(logits, ids, where)
