"""The oracle: a plain per-expert Python loop of the routed expert MLP.

Every fast path is tested against this. It uses nothing but ``x[idx] @ W_e`` per expert, the
activation's forward, and an fp32 accumulation, and autograd does the rest.
"""

from __future__ import annotations

import torch

from .activations import Activation, get_activation
from .dtypes import accum_dtype


def expert_mlp_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str | Activation = "swiglu",
) -> torch.Tensor:
    """``out[t] = sum_s g[t,s] * MLP_{e(t,s)}(x[t])`` with weights in ``[E, in, out]`` layout."""
    act = get_activation(activation)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=accum_dtype(x.dtype), device=x.device)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(expert_ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w_gate_up[e]
        if b_gate_up is not None:
            h = h + b_gate_up[e]
        y = act(h) @ w_down[e]
        if b_down is not None:
            y = y + b_down[e]
        out = out.index_add(0, tok, (gate_weights[tok, slot].unsqueeze(1) * y).to(out.dtype))
    return out.to(x.dtype)
