"""Grouped linear layer as an autograd Function: dX always cheap, dW only when needed."""

from __future__ import annotations

import torch

from .checks import check
from .grouped_gemm import grouped_mm, grouped_wgrad_like, segment_sum
from .wgrad import DeferredWeight, defer, weight_grad


class GroupedLinearFunction(torch.autograd.Function):
    """``y = grouped_mm(x, w, offs)`` with ``w [G, K, N]``.

    Backward: ``dx = grouped_mm(dy, w^T)``, ``dw[g] = x_g^T dy_g``. ``x`` is saved only when
    ``w`` needs a gradient; the weight gradient is skipped for frozen weights. With
    ``deferred`` (see :mod:`groupmoe.ops.wgrad`) ``w`` is a detached alias and dW goes to a
    weight-gradient store.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                deferred: DeferredWeight | None = None) -> torch.Tensor:
        ctx.deferred = deferred
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w, offs)
        return grouped_mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm(dy, w.transpose(-1, -2), offs) if ctx.needs_input_grad[0] else None
        dw = weight_grad(ctx.deferred, ctx.needs_input_grad[1], _wgrad, w, x, dy, offs)
        return dx, dw, None, None


def _wgrad(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor
           ) -> torch.Tensor:
    """dW in ``w``'s own layout (a transposed parameter view gets a matching gradient)."""
    return grouped_wgrad_like(w, x, dy, offs).to(w.dtype)


class GroupBiasFunction(torch.autograd.Function):
    """``y + bias[group_index]`` whose bias gradient sums rows per group in fp32, cast once
    (autograd's own index backward would accumulate in bf16)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor, group_index: torch.Tensor):
        ctx.save_for_backward(group_index)
        ctx.groups = bias.shape[0]
        return y + bias.index_select(0, group_index)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (group_index,) = ctx.saved_tensors
        dbias = None
        if ctx.needs_input_grad[1]:
            dbias = segment_sum(dy, group_index, ctx.groups).to(dy.dtype)
        return dy, dbias, None


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group linear map of expert-sorted rows: ``x_g @ weight[g] (+ bias[g])``.

    ``weight`` is ``[G, in, out]`` (pass ``w.transpose(-1, -2)`` for ``nn.Linear``-layout
    stacks). The bias is added as ``bias[group_index]`` by its own small Function, so its
    gradient is computed eagerly (cheap next to the weight gradient, never deferred).
    """
    check(x.dim() == 2, f"grouped_linear: x must be [rows, in], got {tuple(x.shape)}")
    w, deferred = defer(weight)
    out = GroupedLinearFunction.apply(x, w, offsets, deferred)
    if bias is not None:
        check(group_index is not None, "grouped_linear: a bias needs group_index (row -> group)")
        check(bias.shape == (weight.shape[0], weight.shape[2]),
              f"grouped_linear: bias must be [{weight.shape[0]}, {weight.shape[2]}], "
              f"got {tuple(bias.shape)}")
        out = GroupBiasFunction.apply(out, bias, group_index)
    return out
