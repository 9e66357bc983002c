"""Stacked expert weights with a grouped-GEMM forward."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..ops.activations import Activation, get_activation
from ..ops.checks import check, check_expert_ids
from ..ops.experts import PRECISIONS, Precision, SaveMode, expert_mlp, expert_mlp_naive
from ..ops.reference import expert_mlp_reference
from ..ops.routing import build_routing

Impl = Literal["groupmoe", "naive", "loop"]
IMPLS = ("groupmoe", "naive", "loop")


class GroupedExperts(nn.Module):
    """``E`` MLP experts held as stacks ``gate_up [E, H, 2I]`` (``[E, H, I]``: the up projection
    of an activation without a gate) and ``down [E, I, H]``.

    Args:
        hidden_size, intermediate_size, num_experts: the expert shapes.
        activation: a preset name (``"swiglu"``, ``"gptoss"``, ``"geglu"``, ``"relu2"``) or an
            :class:`~groupmoe.ops.Activation`.
        bias: per-expert biases on both projections (gpt-oss).
        impl: ``"groupmoe"`` (fused, memory-lean), ``"naive"`` (grouped GEMMs under plain
            autograd) or ``"loop"`` (the per-expert reference).
        save: what the groupmoe path keeps for backward, ``"h"`` or ``"none"`` (default
            ``GROUPMOE_SAVE`` or ``"h"``).
        input_grad, weight_grad: ``False`` skips the input / expert parameter gradients even
            where they require grad; ``None`` follows ``requires_grad`` (see
            :func:`~groupmoe.ops.expert_mlp`). Every impl honours them.
        precision: ``"fp8"`` runs the groupmoe impl's forward and dX GEMMs in e4m3 (see
            :func:`~groupmoe.ops.expert_mlp`); the parameters stay in ``dtype``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 activation: str | Activation = "swiglu", bias: bool = False,
                 impl: Impl = "groupmoe",
                 save: SaveMode | None = None, input_grad: bool | None = None,
                 weight_grad: bool | None = None, precision: Precision = "default",
                 device=None, dtype=None):
        super().__init__()
        check(impl in IMPLS, f"GroupedExperts: impl must be one of {IMPLS}, got {impl!r}")
        check(precision in PRECISIONS,
              f"GroupedExperts: precision must be one of {PRECISIONS}, got {precision!r}")
        check(precision == "default" or impl == "groupmoe",
              f"GroupedExperts: precision={precision!r} needs impl='groupmoe', got {impl!r}")
        self.precision = precision
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.activation = get_activation(activation)
        self.impl, self.save = impl, save
        self.input_grad, self.weight_grad = input_grad, weight_grad
        width = 2 * intermediate_size if self.activation.gated else intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, width, **factory))
        self.down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size,
                                             **factory))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, width, **factory)) \
            if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) \
            if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.gate_up, self.down):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        for b in (self.gate_up_bias, self.down_bias):
            if b is not None:
                nn.init.normal_(b, std=0.02)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                gate_weights: torch.Tensor, *, check_ids: bool = True) -> torch.Tensor:
        """``x [T, H]``, ``expert_ids [T, k]``, ``gate_weights [T, k]`` -> ``[T, H]``.

        ``check_ids=False`` skips the ids' range check and the device sync it costs (see
        :func:`~groupmoe.ops.build_routing`), for ids in range by construction, such as a
        router's ``topk`` over ``num_experts`` scores.
        """
        args = (self.gate_up, self.down, self.gate_up_bias, self.down_bias, self.activation)
        if self.impl != "groupmoe":  # the fused Function skips these itself
            x = x.detach() if self.input_grad is False else x
            if self.weight_grad is False:
                args = (*(None if w is None else w.detach() for w in args[:4]), args[4])
        if self.impl == "loop":
            check_expert_ids(expert_ids, self.num_experts, "GroupedExperts", values=check_ids)
            return expert_mlp_reference(x, expert_ids, gate_weights, *args)
        routing = build_routing(expert_ids, self.num_experts, check_ids=check_ids)
        if self.impl == "naive":
            return expert_mlp_naive(x, routing, gate_weights, *args)
        return expert_mlp(x, routing, gate_weights, *args, save=self.save,
                          input_grad=self.input_grad, weight_grad=self.weight_grad,
                          precision=self.precision)
