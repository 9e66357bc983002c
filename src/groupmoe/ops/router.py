"""Router math: logits -> (top-k weights, expert ids), per model family."""

from __future__ import annotations

from typing import Literal

import torch

from .checks import check, checked_ids

RouterKind = Literal["softmax_topk", "topk_softmax"]


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

    Returns ``(weights [T, k] in logits.dtype, expert ids [T, k] int64)``.
    """
    check(logits.dim() == 2,
          lambda: f"{where}: logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    check(1 <= top_k <= num_experts,
          lambda: f"{where}: top_k={top_k} must be between 1 and the number of experts "
                  f"({num_experts})")
    if kind == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), checked_ids(logits, ids, where)
    if kind == "topk_softmax":
        top, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), checked_ids(logits, ids, where)
    raise ValueError(f"{where}: unknown router kind {kind!r}; choose softmax_topk or topk_softmax")
