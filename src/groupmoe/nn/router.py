"""Router module: a linear gate plus one of the routing rules in :mod:`groupmoe.ops.router`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check, check_same_device, check_same_dtype
from ..ops.router import RouterKind, route
from ..ops.wgrad import linear


class TopKRouter(nn.Module):
    """``logits = x W^T (+ b)``, then top-k routing.

    Args:
        hidden_size, num_experts, top_k: the gate's shape and how many experts per token.
        kind: ``"softmax_topk"`` (Qwen/OLMoE/Mixtral) or ``"topk_softmax"`` (gpt-oss).
        normalize: renormalise the k weights (softmax_topk only).
        bias: a gate bias (gpt-oss).
        jitter: Mixtral's multiplicative input jitter in training, ``x * U(1-j, 1+j)``; the
            jittered input feeds the experts too, as in Mixtral.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 kind: RouterKind = "softmax_topk", normalize: bool = True, bias: bool = False,
                 jitter: float = 0.0):
        super().__init__()
        check(1 <= top_k <= num_experts,
              f"TopKRouter: top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.kind, self.normalize, self.jitter = kind, normalize, jitter
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)

    def forward(self, x: torch.Tensor):
        """Returns ``(x_for_experts, logits [T, E], weights [T, k], expert ids [T, k])``."""
        w = self.gate.weight
        check_same_device("TopKRouter", x=x, router_weight=w)
        check_same_dtype("TopKRouter", x=x, router_weight=w)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = linear(x, self.gate.weight, self.gate.bias)  # dW deferrable
        weights, ids = route(logits, self.top_k, self.kind, self.normalize)
        return x, logits, weights, ids
