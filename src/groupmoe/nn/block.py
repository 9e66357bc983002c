"""A sparse MoE block: router -> grouped experts (-> gated shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.activations import Activation
from ..ops.checks import check
from ..ops.experts import Precision, SaveMode
from ..ops.router import RouterKind
from ..ops.wgrad import linear
from .experts import GroupedExperts, Impl
from .router import TopKRouter


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert: a SwiGLU MLP scaled by ``sigmoid(x w_gate)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype, "bias": False}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **f)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **f)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **f)
        self.gate = nn.Linear(hidden_size, 1, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def lin(m, t):  # weight gradients deferrable by the WeightGradStore
            return linear(t, m.weight, m.bias)

        y = lin(self.down_proj, F.silu(lin(self.gate_proj, x)) * lin(self.up_proj, x))
        return torch.sigmoid(lin(self.gate, x)) * y


class MoEBlock(nn.Module):
    """Router, stacked experts and an optional shared expert; returns ``(out, router_logits)``.

    ``out`` has ``x``'s shape ``[..., H]``; ``router_logits`` is ``[tokens, E]`` for an
    auxiliary load-balancing loss. The router and expert arguments are those of
    :class:`TopKRouter` and :class:`GroupedExperts` (``precision="fp8"``: the experts' forward
    and dX GEMMs in e4m3).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 router: RouterKind = "softmax_topk", normalize: bool = True,
                 router_bias: bool = False, jitter: float = 0.0,
                 activation: str | Activation = "swiglu",
                 expert_bias: bool = False, shared_intermediate_size: int | None = None,
                 impl: Impl = "groupmoe", save: SaveMode | None = None,
                 input_grad: bool | None = None, weight_grad: bool | None = None,
                 precision: Precision = "default", device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.router = TopKRouter(hidden_size, num_experts, top_k, router, normalize,
                                 router_bias, jitter).to(**f)
        self.experts = GroupedExperts(hidden_size, intermediate_size, num_experts, activation,
                                      expert_bias, impl, save, input_grad, weight_grad,
                                      precision, **f)
        self.shared_expert = SharedExpert(hidden_size, shared_intermediate_size, **f) \
            if shared_intermediate_size else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = x.shape[-1]
        check(hidden == self.experts.gate_up.shape[1],
              lambda: f"MoEBlock: input hidden size {hidden} != expert hidden size "
              f"{self.experts.gate_up.shape[1]}")
        flat = x.reshape(-1, hidden)
        flat, logits, weights, ids = self.router(flat)
        # TopKRouter's ids are topk over num_experts scores: in range by construction, so no
        # range check (and no device sync per layer); a swapped-in router's are checked
        out = self.experts(flat, ids, weights,
                           check_ids=not isinstance(self.router, TopKRouter))
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(x.shape), logits
