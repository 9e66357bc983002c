"""The routed expert MLP: gate_up -> activation -> scale by router weight -> down -> combine.

Weights are taken in ``[E, in, out]`` layout (``w_gate_up [E, H, 2I]``, ``w_down [E, I, H]``);
pass ``.transpose(-1, -2)`` views of ``nn.Linear``-layout stacks. The router weight ``g``
scales the activation before the down projection, ``a' = g * a``, and the down bias as
``g * b_down`` (so ``g * (a W + b) == a' W + g b``). Its gradient is then
``dg = <da', a> + <dy, b_down>``: no division by ``g`` and nothing of the down output kept.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .activations import Activation, get_activation, scaled_backward, scaled_forward
from .backend import Backend, resolve_backend, use_triton
from .checks import check, check_same_device, check_same_dtype
from .dtypes import accum_dtype, to_accum
from .grouped_gemm import grouped_mm, grouped_wgrad_like, segment_sum
from .grouped_linear import grouped_linear
from .routing import Routing, combine
from .wgrad import DeferredWeight, defer, weight_grad

SaveMode = Literal["h", "none"]
SAVE_MODES = ("h", "none")
DEFAULT_SAVE = os.environ.get("GROUPMOE_SAVE", "h")


def check_expert_args(
    x: torch.Tensor,
    routing: Routing,
    gate_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
) -> None:
    """Shape/dtype/device checks of one expert-MLP call, with messages that name the culprit."""
    where = "experts"
    check(x.dim() == 2, f"{where}: x must be [tokens, hidden], got {tuple(x.shape)}")
    t, h = x.shape
    e = routing.num_experts
    check(w_gate_up.dim() == 3 and w_down.dim() == 3,
          f"{where}: expert weights must be 3-D stacks, got {tuple(w_gate_up.shape)} and "
          f"{tuple(w_down.shape)}")
    check(w_gate_up.shape[0] == e and w_down.shape[0] == e,
          f"{where}: weights hold {w_gate_up.shape[0]}/{w_down.shape[0]} experts, routing has {e}")
    check(w_gate_up.shape[1] == h,
          f"{where}: gate_up weight is [E, {w_gate_up.shape[1]}, 2I] but hidden size is {h}")
    two_i = w_gate_up.shape[2]
    check(two_i % 2 == 0, f"{where}: gate_up output size {two_i} must be even (gate and up)")
    check(w_down.shape[1:] == (two_i // 2, h),
          f"{where}: down weight must be [E, {two_i // 2}, {h}], got {tuple(w_down.shape)}")
    check(routing.num_tokens == t or routing.num_rows == 0,
          f"{where}: routing is for {routing.num_tokens} tokens, x has {t}")
    check(gate_weights.shape == (t, routing.top_k),
          f"{where}: router weights must be [{t}, {routing.top_k}], "
          f"got {tuple(gate_weights.shape)}")
    check(gate_weights.is_floating_point(), f"{where}: router weights must be floating point")
    check(x.is_floating_point(), f"{where}: x must be floating point, got {x.dtype}")
    if b_gate_up is not None:
        check(b_gate_up.shape == (e, two_i),
              f"{where}: gate_up bias must be [{e}, {two_i}], got {tuple(b_gate_up.shape)}")
    if b_down is not None:
        check(b_down.shape == (e, h), f"{where}: down bias must be [{e}, {h}], got "
              f"{tuple(b_down.shape)}")
    check_same_dtype(where, x=x, w_gate_up=w_gate_up, w_down=w_down, b_gate_up=b_gate_up,
                     b_down=b_down)
    check_same_device(where, x=x, gate_weights=gate_weights, w_gate_up=w_gate_up, w_down=w_down,
                      b_gate_up=b_gate_up, b_down=b_down, order=routing.order)


def _gather_sum(rows: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    if use_triton(rows):
        from ..kernels.combine import gather_sum as gather_sum_kernel

        return gather_sum_kernel(rows, routing.inverse, routing.top_k, dtype)
    t, k = routing.num_tokens, routing.top_k
    picked = rows.index_select(0, routing.inverse).view(t, k, rows.shape[1])
    return picked.sum(1, dtype=accum_dtype(rows.dtype)).to(dtype)


class GatherSumFunction(torch.autograd.Function):
    """Autograd for :func:`gather_sum` (the Triton kernel has no autograd of its own)."""

    @staticmethod
    def forward(ctx, rows, routing: Routing, dtype: torch.dtype):
        ctx.routing, ctx.rows_dtype = routing, rows.dtype
        return _gather_sum(rows, routing, dtype)

    @staticmethod
    def backward(ctx, dout):
        return dout.index_select(0, ctx.routing.token_index).to(ctx.rows_dtype), None, None


def gather_sum(rows: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_s rows[sorted row of (t, s)]`` accumulated in fp32, cast once.

    Deterministic (no atomics) and without an fp32 copy of ``rows``; on CUDA one Triton pass
    without the gathered ``[T*k, H]`` copy either. Differentiable in ``rows``.
    """
    if rows.requires_grad and torch.is_grad_enabled():
        return GatherSumFunction.apply(rows, routing, dtype)
    return _gather_sum(rows, routing, dtype)


def bias_prob_grads(
    dy: torch.Tensor, prob: torch.Tensor, bias: torch.Tensor, routing: Routing,
    dy_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``prob[i] * bias[expert(i)]`` (seed 002), ``dbias [E, H]`` and ``dprob [N]``
    in fp32 (fp64 for fp64 inputs).

    ``dbias_e = sum_{i in e} prob_i dy_i`` and ``dprob_i = <dy_i, bias_e>``; a fused Triton
    kernel on CUDA, this torch formula elsewhere. ``dy`` is expert-sorted, or with
    ``dy_index`` row ``i`` is ``dy[dy_index[i]]`` (the kernel reads it in place).
    """
    return bias_prob_grads_rows(dy, prob, bias, routing.offsets, routing.expert_index, dy_index)


def bias_prob_grads_rows(
    dy: torch.Tensor, prob: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor,
    expert_index: torch.Tensor, dy_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bias_prob_grads` of expert-sorted rows given their group ends ``offsets [E]``
    and experts ``expert_index`` (``bias [E, H]``), e.g. a contiguous range of experts."""
    if use_triton(dy):
        from ..kernels.bias_prob import bias_prob_grads as kernel

        return kernel(dy, prob, bias, offsets, expert_index, dy_index)
    if dy_index is not None:
        dy = dy.index_select(0, dy_index)
    dyf = to_accum(dy)
    dbias = segment_sum(dyf * prob.to(dyf.dtype).unsqueeze(1), expert_index, bias.shape[0])
    dprob = (dyf * bias.to(dyf.dtype).index_select(0, expert_index)).sum(1)
    return dbias, dprob


def _gate_up(xs, w1, b1, routing):
    h = grouped_mm(xs, w1, routing.offsets)
    if b1 is not None:
        h += b1.index_select(0, routing.expert_index)
    return h


class ExpertMLPFunction(torch.autograd.Function):
    """The whole routed expert MLP as one autograd node that keeps only what backward needs.

    Saved: ``x`` (the caller's tensor, not a permuted copy), the routing indices, the sorted
    router weights and, with ``save="h"``, the gate_up output ``h``; with ``save="none"``
    backward recomputes ``h``. The down output is never saved. ``deferred`` (one entry per
    weight, see :mod:`groupmoe.ops.wgrad`) sends dW of a detached weight to a store.
    ``backend`` (from :func:`~groupmoe.ops.backend.resolve_backend`): ``"triton"`` runs forward
    and backward on the fused kernels (:mod:`groupmoe.kernels.experts`), ``"triton-forward"``
    the forward only, ``"torch"`` neither.
    """

    @staticmethod
    def forward(ctx, x, gate_weights, w1, w2, b1, b2, routing: Routing, act: Activation,
                save: SaveMode, input_grad: bool, weight_grad: bool, backend: str,
                deferred: tuple[DeferredWeight | None, DeferredWeight | None]):
        g = gate_weights.reshape(-1).index_select(0, routing.order)
        if backend in ("triton", "triton-forward"):  # fused gather + grouped GEMM kernels
            from ..kernels.experts import expert_forward

            h, out = expert_forward(x, g, w1, w2, b1, b2, routing, act, store_h=save == "h")
        else:
            xs = x.index_select(0, routing.token_index)
            h = _gate_up(xs, w1, b1, routing)
            a_scaled = scaled_forward(act, h, g)
            y = grouped_mm(a_scaled, w2, routing.offsets)
            del a_scaled
            if b2 is not None:
                y += g.to(y.dtype).unsqueeze(1) * b2.index_select(0, routing.expert_index)
            out = gather_sum(y, routing, x.dtype)
        ctx.routing, ctx.act, ctx.backend = routing, act, backend
        ctx.input_grad, ctx.weight_grad, ctx.deferred = input_grad, weight_grad, deferred
        ctx.gate_dtype = gate_weights.dtype
        ctx.save_for_backward(x, g, w1, w2, b1, b2)
        # h is an intermediate, not an input or output: held on ctx (not save_for_backward)
        # so backward can free it as soon as dh exists.
        ctx.h = h if save == "h" else None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, g, w1, w2, b1, b2 = ctx.saved_tensors
        h, ctx.h = ctx.h, None
        routing, act = ctx.routing, ctx.act
        need_x, need_g, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:6]
        need_x = need_x and ctx.input_grad
        need_w1, need_w2, need_b1, need_b2 = (
            n and ctx.weight_grad for n in (need_w1, need_w2, need_b1, need_b2))
        offs = routing.offsets
        dout = dout.contiguous()
        fused = ctx.backend == "triton"
        if fused:  # the kernels read dout and x rows through token_index: no permuted copies
            from ..kernels import experts as kx

            wgrad = kx.grouped_wgrad
            if h is None:  # save="none": rebuild h
                h = kx.gate_up(x, w1, b1, routing)
            dy, dy_rows = dout, routing.token_index
            dh, a_scaled, dg = kx.down_backward(dout, h, g, w2, routing, act, need_w2, need_g)
        else:
            wgrad = _wgrad
            if h is None:
                h = _gate_up(x.index_select(0, routing.token_index), w1, b1, routing)
            dy, dy_rows = dout.index_select(0, routing.token_index), None
            da_scaled = grouped_mm(dy, w2.transpose(-1, -2), offs)
            dh, a_scaled, dg = scaled_backward(act, h, g, da_scaled, need_w2, need_g)
            del da_scaled
        del h
        defer_w1, defer_w2 = ctx.deferred
        dw2 = weight_grad(defer_w2, need_w2, wgrad, w2, a_scaled, None, dy, dy_rows, offs)
        del a_scaled
        db2 = None
        if b2 is not None and (need_g or need_b2):
            db2_acc, dprob = bias_prob_grads(dy, g, b2, routing, dy_rows)
            db2 = db2_acc.to(b2.dtype) if need_b2 else None
            dg = dg + dprob if dg is not None else None
        del dy
        dw1 = weight_grad(defer_w1, need_w1, wgrad, w1, x, routing.token_index, dh, None, offs)
        db1 = segment_sum(dh, routing.expert_index, routing.num_experts, offs).to(b1.dtype) \
            if need_b1 else None
        dx = None
        if need_x:
            if fused:  # rows stored at their (token, slot) position, summed in registers
                dxs = kx.input_grad_rows(dh, w1, routing)
                del dh
                dx = kx.sum_slots(dxs, routing, x.dtype)
            else:
                dxs = grouped_mm(dh, w1.transpose(-1, -2), offs)
                del dh
                dx = gather_sum(dxs, routing, x.dtype)
        dgate = None
        if need_g:
            dgate = torch.empty_like(dg).index_copy_(0, routing.order, dg)
            dgate = dgate.view(routing.num_tokens, routing.top_k).to(ctx.gate_dtype)
        return dx, dgate, dw1, dw2, db1, db2, None, None, None, None, None, None, None


def _wgrad(w: torch.Tensor, a: torch.Tensor, a_rows: torch.Tensor | None, dy: torch.Tensor,
           dy_rows: torch.Tensor | None, offs: torch.Tensor) -> torch.Tensor:
    """``dW[e] = a_e^T dy_e`` in ``w``'s own layout (transposed parameter views included), the
    rows of ``a``/``dy`` taken through ``a_rows``/``dy_rows`` where given (the signature of
    :func:`groupmoe.kernels.grouped_bwd.grouped_wgrad`)."""
    a = a if a_rows is None else a.index_select(0, a_rows)
    dy = dy if dy_rows is None else dy.index_select(0, dy_rows)
    return grouped_wgrad_like(w, a, dy, offs).to(w.dtype)


def expert_mlp(
    x: torch.Tensor,
    routing: Routing,
    gate_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str | Activation = "swiglu",
    save: SaveMode | None = None,
    input_grad: bool | None = None,
    weight_grad: bool | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Routed expert MLP of ``x [T, H]``, summed over each token's ``top_k`` experts.

    Args:
        routing: from :func:`build_routing` on the router's ``[T, k]`` expert ids.
        gate_weights: router weights ``[T, k]``; receive a gradient when they require one.
        w_gate_up: ``[E, H, 2I]``; w_down: ``[E, I, H]`` (``[E, in, out]`` layout).
        b_gate_up, b_down: optional per-expert biases ``[E, 2I]`` and ``[E, H]``.
        activation: ``"swiglu"`` (gate half first), ``"gptoss"`` (interleaved, clamped), or an
            :class:`Activation`.
        save: ``"h"`` keeps the gate_up output for backward; ``"none"`` recomputes it (one
            extra grouped GEMM in backward, least memory). Default: ``GROUPMOE_SAVE`` or
            ``"h"``.
        input_grad: ``False`` skips ``dx`` even if ``x`` requires grad (e.g. the first layer);
            ``None`` or ``True``: ``dx`` when ``x`` requires grad.
        weight_grad: ``False`` skips the expert weight and bias gradients even if they require
            grad (frozen experts that were not marked ``requires_grad=False``; their ``.grad``
            stays ``None``); ``None`` or ``True``: follow ``requires_grad``.
        Tensors that do not require grad never get one, whatever these say; the router
        weights' gradient follows their ``requires_grad`` only.
        backend: ``"triton"`` runs forward and backward on the fused gather + grouped GEMM
            kernels, ``"torch"`` on torch's grouped_mm, ``"auto"`` picks per call (see
            :mod:`groupmoe.ops.backend`); ``None`` takes the process default
            (:func:`~groupmoe.ops.backend.set_backend`, ``GROUPMOE_BACKEND``).
    Returns:
        ``[T, H]`` in ``x``'s dtype, accumulated over the k slots in fp32.
    """
    save = DEFAULT_SAVE if save is None else save
    check(save in SAVE_MODES, f"expert_mlp: save must be 'h' or 'none' (argument or "
          f"GROUPMOE_SAVE), got {save!r}")
    check_expert_args(x, routing, gate_weights, w_gate_up, w_down, b_gate_up, b_down)
    act = get_activation(activation)
    w1, defer_w1 = defer(w_gate_up)
    w2, defer_w2 = defer(w_down)
    return ExpertMLPFunction.apply(x, gate_weights, w1, w2, b_gate_up, b_down,
                                   routing, act, save, input_grad is not False,
                                   weight_grad is not False,
                                   resolve_backend(backend, x, act, b_down is not None),
                                   (defer_w1, defer_w2))


def expert_mlp_naive(
    x: torch.Tensor,
    routing: Routing,
    gate_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str | Activation = "swiglu",
) -> torch.Tensor:
    """The same math composed from differentiable pieces under plain autograd (the baseline:
    sort, grouped GEMMs, activation, weighted fp32 ``index_add`` combine)."""
    check_expert_args(x, routing, gate_weights, w_gate_up, w_down, b_gate_up, b_down)
    act = get_activation(activation)
    xs = x.index_select(0, routing.token_index)
    h = grouped_linear(xs, w_gate_up, routing.offsets, b_gate_up, routing.expert_index)
    y = grouped_linear(act(h), w_down, routing.offsets, b_down, routing.expert_index)
    return combine(y, routing, gate_weights)
