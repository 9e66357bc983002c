"""Grouped linear layer as a custom op: dX always cheap, dW only when needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check
from .grouped_gemm import grouped_mm, grouped_wgrad_in_layout, segment_sum, wgrad_like
from .library import custom_op, differentiable, needs_input_grad
from .stacks import Stack, as_list, assemble, is_transposed, stack_shape
from .wgrad import defer_stack, deferred_of, stack_weight_grad

Tensor = torch.Tensor


@custom_op("grouped_mm")
def _grouped_mm_op(x: Tensor, w: Sequence[Tensor], offsets: Tensor, transpose_w: bool
                   ) -> Tensor:
    """``x_g @ w[g]`` (``w[g]^T`` when ``transpose_w``) for the expert-sorted rows of ``x``."""
    stack = assemble(w, offsets.numel())
    return grouped_mm(x, stack.transpose(-1, -2) if transpose_w else stack, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, transpose_w):
    _, d_in, d_out = stack_shape(w, offsets.numel(), "grouped_linear")
    return x.new_empty(x.shape[0], d_in if transpose_w else d_out)


@custom_op("grouped_wgrad")
def _grouped_wgrad_op(x: Tensor, dy: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    return grouped_wgrad_in_layout(x, dy, offsets, transposed)


@_grouped_wgrad_op.register_fake
def _(x, dy, offsets, transposed):
    return wgrad_like(x, offsets.numel(), x.shape[1], dy.shape[1], transposed)


def _setup(ctx, inputs, output):
    x, w, offsets, transpose_w = inputs
    check(not transpose_w, "grouped_linear: the transposed product has no autograd")
    ctx.n = len(w)
    ctx.transposed, ctx.deferred = is_transposed(w), deferred_of(w)
    ctx.save_for_backward(x if any(p.requires_grad for p in w) else None, offsets, *w)


def _backward(ctx, dy):
    x, offsets, *w = ctx.saved_tensors
    need_x, needs_w = needs_input_grad(ctx)[:2]
    dy = dy.contiguous()
    dx = _grouped_mm_op(dy, w, offsets, True) if need_x else None
    dw = stack_weight_grad(ctx.deferred, any(needs_w), w, _grouped_wgrad_op, x, dy, offsets,
                           ctx.transposed)
    dw = [None if d is None or not n else d.to(p.dtype)
          for d, p, n in zip(dw or [None] * len(w), w, needs_w)]
    return dx, dw, None, None


_grouped_mm_autograd = differentiable(_grouped_mm_op, _backward, _setup)


@custom_op("group_bias")
def _group_bias_op(y: Tensor, bias: Tensor, group_index: Tensor) -> Tensor:
    """``y + bias[group_index]``, whose bias gradient sums rows per group in fp32, cast once
    (autograd's own index backward would accumulate in bf16)."""
    return y + bias.index_select(0, group_index)


@_group_bias_op.register_fake
def _(y, bias, group_index):
    return torch.empty_like(y)


@custom_op("group_bias_backward")
def _group_bias_backward_op(dy: Tensor, group_index: Tensor, groups: int) -> Tensor:
    return segment_sum(dy, group_index, groups).to(dy.dtype)


@_group_bias_backward_op.register_fake
def _(dy, group_index, groups):
    return dy.new_empty(groups, *dy.shape[1:])


def _bias_setup(ctx, inputs, output):
    y, bias, group_index = inputs
    ctx.groups = bias.shape[0]
    ctx.save_for_backward(group_index)


def _bias_backward(ctx, dy):
    (group_index,) = ctx.saved_tensors
    dbias = _group_bias_backward_op(dy, group_index, ctx.groups) \
        if needs_input_grad(ctx)[1] else None
    return dy, dbias, None


_group_bias_autograd = differentiable(_group_bias_op, _bias_backward, _bias_setup)


def grouped_linear(
    x: Tensor,
    weight: Stack,
    offsets: Tensor,
    bias: Tensor | None = None,
    group_index: Tensor | None = None,
) -> Tensor:
    """Per-group linear map of expert-sorted rows: ``x_g @ weight[g] (+ bias[g])``.

    ``weight`` is ``[G, in, out]`` (pass ``w.transpose(-1, -2)`` for ``nn.Linear``-layout
    stacks), or per-group ``nn.Linear`` weights as a list (:mod:`groupmoe.ops.stacks`). ``x``
    is kept for backward only when the weight needs a gradient. The bias is added as
    ``bias[group_index]`` by its own small op, so its gradient is computed eagerly (cheap
    next to the weight gradient, never deferred).
    """
    check(x.dim() == 2, lambda: f"grouped_linear: x must be [rows, in], got {tuple(x.shape)}")
    ws = as_list(weight)
    groups, d_in, d_out = stack_shape(ws, offsets.numel(), "grouped_linear")
    check(d_in == x.shape[1], lambda: f"grouped_linear: weight is [{groups}, {d_in}, {d_out}] "
          f"but x has {x.shape[1]} columns")
    ws, _ = defer_stack(ws)
    out = _grouped_mm_autograd(x, ws, offsets, False)
    if bias is not None:
        check(group_index is not None, "grouped_linear: a bias needs group_index (row -> group)")
        check(bias.shape == (groups, d_out),
              lambda: f"grouped_linear: bias must be [{groups}, {d_out}], got {tuple(bias.shape)}")
        out = _group_bias_autograd(out, bias, group_index)
    return out
