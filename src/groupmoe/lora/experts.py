"""LoRA on experts, grouped: ``x W + ((x A) B) * scale`` per expert, never forming ``W + BA``.

The LoRA terms run as grouped GEMMs on the same expert-sorted rows as the base projection
(rank ``r`` is small, so they cost ``2 r (in + out)`` flops per row against ``2 in out``). The
base weights are frozen (bf16, or dequantized NF4); ``A``/``B``, ``x`` and the router weights
get gradients through autograd over :func:`~groupmoe.ops.grouped_linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.activations import Activation, gated_act, get_activation
from ..ops.checks import check
from ..ops.experts import check_expert_args, gather_sum
from ..ops.grouped_linear import grouped_linear
from ..ops.routing import Routing
from ..ops.stacks import Stack, as_list, stack_shape
from .chunked import ChunkedWeights, chunked_expert_mlp
from .factors import ExpertLoRA, LoRAFactors


def _lora_linear(x: torch.Tensor, w: Stack, lora: LoRAFactors | None, offs: torch.Tensor,
                 bias: torch.Tensor | None = None, group_index: torch.Tensor | None = None):
    y = grouped_linear(x, w, offs, bias, group_index)
    if lora is not None:
        # small (rank r): copy to the dense layout grouped_mm kernels accept (peft's are permuted)
        a, b = lora.a.to(x.dtype).contiguous(), lora.b.to(x.dtype).contiguous()
        y = y + grouped_linear(grouped_linear(x, a, offs), b, offs) * lora.scale
    return y


def expert_mlp_lora(
    x: torch.Tensor,
    routing: Routing,
    gate_weights: torch.Tensor,
    w_gate_up: Stack,
    w_down: Stack,
    lora: ExpertLoRA | None,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str | Activation = "swiglu",
) -> torch.Tensor:
    """Routed expert MLP with per-expert LoRA on ``gate_up`` and ``down``, grouped.

    Same contract as :func:`groupmoe.ops.expert_mlp` (weights ``[E, in, out]`` or per-expert
    ``nn.Linear`` lists, router weight applied before the down projection, fp32 combine), plus
    ``lora``. LoRA factors are cast to ``x``'s dtype for the GEMMs; their gradients flow back in
    their own dtype. Frozen stacked weights (the usual LoRA case) run the fused
    :func:`~groupmoe.lora.chunked_expert_mlp` op; trainable or per-expert weights run grouped
    linears under autograd.
    """
    act = get_activation(activation)
    check_expert_args(x, routing, gate_weights, w_gate_up, w_down, b_gate_up, b_down, act)
    lora = lora or ExpertLoRA()
    w1s, w2s = as_list(w_gate_up), as_list(w_down)
    e, h, two_i = stack_shape(w1s, routing.num_experts, "expert_mlp_lora")
    lora.check(e, h, act.out_width(two_i), "expert_mlp_lora", act.gated)
    if len(w1s) == len(w2s) == 1 and not (w1s[0].requires_grad or w2s[0].requires_grad):
        # frozen stacks (the LoRA case): one fused op forward and one backward, saving h and
        # the rank-r intermediates only; a single chunk reads nothing back to the host
        return chunked_expert_mlp(x, routing, gate_weights, ChunkedWeights.dense(w1s[0]),
                                  ChunkedWeights.dense(w2s[0]), e, act, lora, b_gate_up, b_down)
    offs, idx = routing.offsets, routing.expert_index
    xs = x.index_select(0, routing.token_index)
    hid = _lora_linear(xs, w_gate_up, lora.gate_up, offs, b_gate_up, idx)
    g = gate_weights.reshape(-1).index_select(0, routing.order).to(x.dtype).unsqueeze(1)
    a = gated_act(hid, act) * g
    y = _lora_linear(a, w_down, lora.down, offs)
    if b_down is not None:
        y = y + g * b_down.index_select(0, idx)
    return gather_sum(y, routing, x.dtype)


class ExpertLoRAModule(nn.Module):
    """Trainable LoRA factors for a stack of ``E`` experts (``A`` random, ``B`` zero at init).

    Args:
        rank, alpha: ``scale = alpha / rank``.
        targets: any of ``"gate_up"``, ``"down"``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, rank: int,
                 alpha: float | None = None, targets: tuple[str, ...] = ("gate_up", "down"),
                 device=None, dtype=None):
        super().__init__()
        check(rank >= 1, f"ExpertLoRAModule: rank must be >= 1, got {rank}")
        check(set(targets) <= {"gate_up", "down"} and len(targets) > 0,
              f"ExpertLoRAModule: targets must be a subset of ('gate_up', 'down'), got {targets}")
        self.scale = (alpha if alpha is not None else rank) / rank
        dims = {"gate_up": (hidden_size, 2 * intermediate_size),
                "down": (intermediate_size, hidden_size)}
        self.targets = tuple(targets)
        for name in self.targets:
            d_in, d_out = dims[name]
            a = torch.empty(num_experts, d_in, rank, device=device, dtype=dtype)
            nn.init.normal_(a, std=1.0 / d_in ** 0.5)
            self.register_parameter(f"{name}_a", nn.Parameter(a))
            self.register_parameter(f"{name}_b", nn.Parameter(
                torch.zeros(num_experts, rank, d_out, device=device, dtype=dtype)))

    def factors(self) -> ExpertLoRA:
        """The adapters as :class:`ExpertLoRA` (views of the parameters)."""
        parts = {n: LoRAFactors(getattr(self, f"{n}_a"), getattr(self, f"{n}_b"), self.scale)
                 for n in self.targets}
        return ExpertLoRA(**parts)
