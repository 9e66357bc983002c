"""Causal-LM loss without the whole ``[tokens, vocab]`` logits: the LM head and cross-entropy
run over chunks of positions, each chunk's logits recomputed in backward (activation
checkpointing). With a 201k vocabulary (gpt-oss) the whole logits and their fp32 loss take
~2.4 GiB at 2048 tokens (bf16 logits, their fp32 copy and its gradient); a 256-position chunk
holds an eighth of that."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden.to(head.weight.dtype)).float()  # accelerate hands fp32 outputs
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk: int, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels`` shifted by one (as
    transformers' causal-LM loss), ``chunk`` positions at a time.

    ``hidden [B, S, H]``, ``labels [B, S]`` (``-100`` ignored); the sum is divided by
    ``num_items`` (the Trainer's token count over accumulated micro-batches) or, without it,
    by this batch's counted labels.
    """
    if chunk < 1:
        raise ValueError(f"chunked_lm_loss: chunk must be >= 1, got {chunk}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"chunked_lm_loss: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)} disagree on [batch, seq]")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, head, h[start:start + chunk],
                                   y[start:start + chunk], use_reentrant=False)
    count = num_items if num_items is not None else (y != IGNORE).sum()
    return total / count


class HiddenStates(nn.Module):
    """Stands in for a causal LM's ``lm_head``: passes the final hidden states through (so the
    model's ``logits`` output holds them) and keeps the real head for :func:`chunked_lm_loss`."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def chunked_loss_reason(lm: nn.Module) -> str | None:
    """Why ``lm``'s loss cannot be chunked outside the model (``None``: it can)."""
    cfg = lm.config
    if not isinstance(getattr(lm, "lm_head", None), nn.Linear):
        return "the model has no nn.Linear lm_head"
    if getattr(cfg, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if getattr(cfg, "output_router_logits", False):
        return "the model adds its router auxiliary loss to the LM loss"
    return None


def use_chunked_loss(lm: nn.Module, chunk: int):
    """Swap ``lm``'s head for :class:`HiddenStates`; returns the Trainer's
    ``compute_loss_func`` that finishes the loss ``chunk`` positions at a time."""
    head = lm.lm_head
    lm.lm_head = HiddenStates(head)

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return chunked_lm_loss(head, outputs.logits, labels, chunk, num_items_in_batch)

    return compute_loss
