"""The routed expert MLP: gate_up -> activation -> scale by router weight -> down -> combine.

Weights are taken in ``[E, in, out]`` layout (``w_gate_up [E, H, 2I]``, ``w_down [E, I, H]``);
pass ``.transpose(-1, -2)`` views of ``nn.Linear``-layout stacks, or per-expert ``nn.Linear``
weights as a list (:mod:`groupmoe.ops.stacks`). The router weight ``g`` scales the activation
before the down projection, ``a' = g * a``, and the down bias as ``g * b_down`` (so
``g * (a W + b) == a' W + g b``). Its gradient is then ``dg = <da', a> + <dy, b_down>``: no
division by ``g`` and nothing of the down output kept.

The forward is one custom op (``groupmoe::expert_mlp``) with a registered backward made of a
few more (:mod:`groupmoe.ops.library`): torch.compile sees one node per piece, and a compiled
backward frees ``h`` and the down projection's intermediates as soon as they are used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

from .activations import (
    Activation,
    activation_from_spec,
    get_activation,
    scaled_backward,
    scaled_forward,
)
from .backend import Backend, resolve_backend, use_triton
from .checks import check, check_same_device, check_same_dtype
from .dtypes import accum_dtype, to_accum
from .fp8 import fp8_grouped_mm
from .grouped_gemm import grouped_mm, grouped_wgrad_in_layout, segment_sum, wgrad_like
from .grouped_linear import grouped_linear
from .library import absent, custom_op, differentiable, needs_input_grad, release_saved
from .routing import Routing, combine
from .stacks import Stack, as_list, assemble, is_transposed, split_grad, stack_shape
from .wgrad import defer_stack, deferred_of, stack_weight_grad

SaveMode = Literal["h", "none"]
SAVE_MODES = ("h", "none")
Precision = Literal["default", "fp8"]
PRECISIONS = ("default", "fp8")
DEFAULT_SAVE = os.environ.get("GROUPMOE_SAVE", "h")
Tensor = torch.Tensor


def check_expert_args(
    x: Tensor,
    routing: Routing,
    gate_weights: Tensor,
    w_gate_up: Stack,
    w_down: Stack,
    b_gate_up: Tensor | None,
    b_down: Tensor | None,
    act: Activation,
) -> None:
    """Shape/dtype/device checks of one expert-MLP call, with messages that name the culprit."""
    where = "experts"
    check(x.dim() == 2, lambda: f"{where}: x must be [tokens, hidden], got {tuple(x.shape)}")
    t, h = x.shape
    e = routing.num_experts
    w1, w2 = as_list(w_gate_up), as_list(w_down)
    s1, s2 = stack_shape(w1, e, where), stack_shape(w2, e, where)
    check(s1[0] == e and s2[0] == e,
          lambda: f"{where}: weights hold {s1[0]}/{s2[0]} experts, routing has {e}")
    check(s1[1] == h, lambda: f"{where}: gate_up weight is [E, {s1[1]}, 2I] but hidden size is {h}")
    two_i = s1[2]
    check(two_i % 2 == 0 or not act.gated,
          f"{where}: gate_up output size {two_i} must be even (gate and up)")
    inter = act.out_width(two_i)
    check(s2[1:] == (inter, h),
          lambda: f"{where}: down weight must be [E, {inter}, {h}], got {tuple(s2)}")
    check(routing.num_tokens == t or routing.num_rows == 0,
          lambda: f"{where}: routing is for {routing.num_tokens} tokens, x has {t}")
    check(gate_weights.shape == (t, routing.top_k),
          lambda: f"{where}: router weights must be [{t}, {routing.top_k}], "
          f"got {tuple(gate_weights.shape)}")
    check(gate_weights.is_floating_point(), f"{where}: router weights must be floating point")
    check(x.is_floating_point(), f"{where}: x must be floating point, got {x.dtype}")
    if b_gate_up is not None:
        check(b_gate_up.shape == (e, two_i),
              lambda: f"{where}: gate_up bias must be [{e}, {two_i}], got {tuple(b_gate_up.shape)}")
    if b_down is not None:
        check(b_down.shape == (e, h), lambda: f"{where}: down bias must be [{e}, {h}], got "
              f"{tuple(b_down.shape)}")
    check_same_dtype(where, x=x, w_gate_up=w1[0], w_down=w2[0], b_gate_up=b_gate_up,
                     b_down=b_down)
    check_same_device(where, x=x, gate_weights=gate_weights, w_gate_up=w1[0], w_down=w2[0],
                      b_gate_up=b_gate_up, b_down=b_down, order=routing.order)


def _gather_sum(rows: Tensor, routing: Routing, dtype: torch.dtype) -> Tensor:
    if use_triton(rows):
        from ..kernels.combine import gather_sum as gather_sum_kernel

        return gather_sum_kernel(rows, routing.inverse, routing.top_k, dtype)
    t, k = routing.num_tokens, routing.top_k
    picked = rows.index_select(0, routing.inverse).view(t, k, rows.shape[1])
    return picked.sum(1, dtype=accum_dtype(rows.dtype)).to(dtype)


@custom_op("gather_sum")
def _gather_sum_op(rows: Tensor, routing: Sequence[Tensor], top_k: int, dtype: torch.dtype
                   ) -> Tensor:
    return _gather_sum(rows, Routing.from_tensors(routing, top_k), dtype)


@_gather_sum_op.register_fake
def _(rows, routing, top_k, dtype):
    return rows.new_empty(routing[0].numel() // max(top_k, 1), rows.shape[1], dtype=dtype)


def _gather_sum_setup(ctx, inputs, output):
    rows, routing, top_k, dtype = inputs
    ctx.rows_dtype = rows.dtype
    ctx.save_for_backward(routing[2])  # token_index


def _gather_sum_backward(ctx, dout):
    (token_index,) = ctx.saved_tensors
    return dout.index_select(0, token_index).to(ctx.rows_dtype), [None] * 6, None, None


_gather_sum_autograd = differentiable(_gather_sum_op, _gather_sum_backward, _gather_sum_setup)


def gather_sum(rows: Tensor, routing: Routing, dtype: torch.dtype) -> Tensor:
    """``out[t] = sum_s rows[sorted row of (t, s)]`` accumulated in fp32, cast once.

    Deterministic (no atomics) and without an fp32 copy of ``rows``; on CUDA one Triton pass
    without the gathered ``[T*k, H]`` copy either. Differentiable in ``rows``.
    """
    return _gather_sum_autograd(rows, routing.tensors(), routing.top_k, dtype)


def bias_prob_grads(
    dy: Tensor, prob: Tensor, bias: Tensor, routing: Routing, dy_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``prob[i] * bias[expert(i)]`` (seed 002), ``dbias [E, H]`` and ``dprob [N]``
    in fp32 (fp64 for fp64 inputs).

    ``dbias_e = sum_{i in e} prob_i dy_i`` and ``dprob_i = <dy_i, bias_e>``; a fused Triton
    kernel on CUDA, this torch formula elsewhere. ``dy`` is expert-sorted, or with
    ``dy_index`` row ``i`` is ``dy[dy_index[i]]`` (the kernel reads it in place).
    """
    return bias_prob_grads_rows(dy, prob, bias, routing.offsets, routing.expert_index, dy_index)


def bias_prob_grads_rows(
    dy: Tensor, prob: Tensor, bias: Tensor, offsets: Tensor, expert_index: Tensor,
    dy_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
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


def _mm(a: Tensor, w: Tensor, offsets: Tensor, fp8: bool) -> Tensor:
    """A forward or dX grouped GEMM, in FP8 (rowwise scales, :mod:`groupmoe.ops.fp8`) when
    asked; weight gradients stay in the input precision."""
    return fp8_grouped_mm(a, w, offsets, a.dtype) if fp8 else grouped_mm(a, w, offsets)


def _gate_up(xs: Tensor, w1: Tensor, b1: Tensor | None, routing: Routing, fp8: bool = False
             ) -> Tensor:
    h = _mm(xs, w1, routing.offsets, fp8)
    if b1 is not None:
        h += b1.index_select(0, routing.expert_index)
    return h


def _forward(x, g, w1, w2, b1, b2, routing: Routing, act: Activation, save_h: bool,
             backend: str, fp8: bool) -> tuple[Tensor | None, Tensor]:
    """``(h or None, out)``: the expert MLP's forward on ``g`` in expert-sorted order."""
    if backend in ("triton", "triton-forward"):  # fused gather + grouped GEMM kernels
        from ..kernels.experts import expert_forward

        return expert_forward(x, g, w1, w2, b1, b2, routing, act, store_h=save_h)
    h = _gate_up(x.index_select(0, routing.token_index), w1, b1, routing, fp8)
    a_scaled = scaled_forward(act, h, g)
    y = _mm(a_scaled, w2, routing.offsets, fp8)
    del a_scaled
    if b2 is not None:
        y += g.to(y.dtype).unsqueeze(1) * b2.index_select(0, routing.expert_index)
    return h, _gather_sum(y, routing, x.dtype)


@custom_op("expert_mlp")
def _expert_mlp_op(x: Tensor, g: Tensor, w1: Sequence[Tensor], w2: Sequence[Tensor],
                   b1: Tensor | None, b2: Tensor | None, routing: Sequence[Tensor], top_k: int,
                   act: str, save_h: bool, backend: str, input_grad: bool, weight_grad: bool,
                   fp8: bool) -> tuple[Tensor, Tensor]:
    r = Routing.from_tensors(routing, top_k)
    e = r.num_experts
    h, out = _forward(x, g, assemble(w1, e), assemble(w2, e), b1, b2, r,
                      activation_from_spec(act), save_h, backend, fp8)
    return out, h if save_h else absent(x)


@_expert_mlp_op.register_fake
def _(x, g, w1, w2, b1, b2, routing, top_k, act, save_h, backend, input_grad, weight_grad,
      fp8):
    two_i = stack_shape(w1, routing[-1].numel(), "experts")[2]
    return x.new_empty(x.shape), x.new_empty(routing[0].numel(), two_i) if save_h else absent(x)


def _wgrad(a: Tensor, a_rows: Tensor | None, dy: Tensor, dy_rows: Tensor | None,
           offsets: Tensor, transposed: bool, fused: bool) -> Tensor:
    """``dW[e] = a_e^T dy_e`` (``[E, in, out]``, as the transposed view of ``[E, out, in]``
    storage when ``transposed``), the rows of ``a``/``dy`` taken through ``a_rows``/
    ``dy_rows`` where given."""
    if fused:
        from ..kernels.experts import grouped_wgrad

        return grouped_wgrad(a, a_rows, dy, dy_rows, offsets, transposed=transposed)
    a = a if a_rows is None else a.index_select(0, a_rows)
    dy = dy if dy_rows is None else dy.index_select(0, dy_rows)
    return grouped_wgrad_in_layout(a, dy, offsets, transposed)


# what the backward does with a weight gradient: nothing, compute it, or leave it to a
# WeightGradStore (the op then returns what the store's closure needs)
WGRAD_SKIP, WGRAD_NOW, WGRAD_DEFER = 0, 1, 2


@custom_op("expert_down_backward")
def _down_backward_op(dout: Tensor, x: Tensor, h: Tensor | None, g: Tensor,
                      w1: Sequence[Tensor], b1: Tensor | None, w2: Sequence[Tensor],
                      b2: Tensor | None, routing: Sequence[Tensor], top_k: int, act: str,
                      fused: bool, dw2_mode: int, need_dg: bool, need_db2: bool,
                      transposed: bool, fp8: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The down projection's backward from the ``[T, H]`` output gradient: ``(dh, dg, dW2,
    db2, g * act(h), dy)``. ``h`` is rebuilt from ``x``, ``w1``, ``b1`` when not saved. The
    last two are returned only for a WeightGradStore (``dw2_mode`` defer; ``dy`` are the
    expert-sorted rows of ``dout``, absent when ``fused``: its kernels read ``dout`` through
    the routing instead of a permuted copy)."""
    r = Routing.from_tensors(routing, top_k)
    w = assemble(w2, r.num_experts)
    activation = activation_from_spec(act)
    if h is None:  # save="none"
        w_up = assemble(w1, r.num_experts)
        if fused:
            from ..kernels.experts import gate_up

            h = gate_up(x, w_up, b1, r)
        else:
            h = _gate_up(x.index_select(0, r.token_index), w_up, b1, r, fp8)
    want_a = dw2_mode != WGRAD_SKIP
    if fused:
        from ..kernels.experts import down_backward

        dy, dy_rows = dout, r.token_index
        dh, a_scaled, dg = down_backward(dout, h, g, w, r, activation, want_a, need_dg)
    else:
        dy, dy_rows = dout.index_select(0, r.token_index), None
        da_scaled = _mm(dy, w.transpose(-1, -2), r.offsets, fp8)
        dh, a_scaled, dg = scaled_backward(activation, h, g, da_scaled, want_a, need_dg)
        del da_scaled
    del h
    dw2 = absent(x)
    if dw2_mode == WGRAD_NOW:
        dw2 = _wgrad(a_scaled, None, dy, dy_rows, r.offsets, transposed, fused)
    db2 = absent(x)
    if b2 is not None and (need_dg or need_db2):
        db2_acc, dprob = bias_prob_grads_rows(dy, g, b2, r.offsets, r.expert_index, dy_rows)
        db2 = db2_acc.to(b2.dtype) if need_db2 else db2
        dg = dg + dprob if need_dg else dg
    keep = dw2_mode == WGRAD_DEFER
    return (dh, dg.to(g.dtype) if need_dg else absent(x), dw2, db2,
            a_scaled if keep else absent(x), dy if keep and not fused else absent(x))


@_down_backward_op.register_fake
def _(dout, x, h, g, w1, b1, w2, b2, routing, top_k, act, fused, dw2_mode, need_dg, need_db2,
      transposed, fp8):
    e, inter, hidden = stack_shape(w2, routing[-1].numel(), "experts")
    n = routing[0].numel()
    keep = dw2_mode == WGRAD_DEFER
    return (x.new_empty(n, 2 * inter),
            g.new_empty(n) if need_dg else absent(x),
            wgrad_like(x, e, inter, hidden, transposed) if dw2_mode == WGRAD_NOW
            else absent(x),
            b2.new_empty(b2.shape) if b2 is not None and need_db2 else absent(x),
            x.new_empty(n, inter) if keep else absent(x),
            x.new_empty(n, hidden) if keep and not fused else absent(x))


@custom_op("expert_gate_up_backward")
def _gate_up_backward_op(dh: Tensor, x: Tensor, w1: Sequence[Tensor], routing: Sequence[Tensor],
                         top_k: int, fused: bool, need_dx: bool, need_dw1: bool,
                         need_db1: bool, transposed: bool, fp8: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The gate_up projection's backward from ``dh``: ``(dx [T, H], dW1, db1)`` (``dx`` the
    k rows of each token summed in fp32, cast once)."""
    r = Routing.from_tensors(routing, top_k)
    dw1 = _wgrad(x, r.token_index, dh, None, r.offsets, transposed, fused) if need_dw1 \
        else absent(x)
    db1 = segment_sum(dh, r.expert_index, r.num_experts, r.offsets).to(dh.dtype) if need_db1 \
        else absent(x)
    dx = absent(x)
    if need_dx:
        w = assemble(w1, r.num_experts)
        if fused:  # rows stored at their (token, slot) position, summed in registers
            from ..kernels.experts import input_grad_rows, sum_slots

            dx = sum_slots(input_grad_rows(dh, w, r), r, x.dtype)
        else:
            dx = _gather_sum(_mm(dh, w.transpose(-1, -2), r.offsets, fp8), r, x.dtype)
    return dx, dw1, db1


@_gate_up_backward_op.register_fake
def _(dh, x, w1, routing, top_k, fused, need_dx, need_dw1, need_db1, transposed, fp8):
    e, hidden, two_i = stack_shape(w1, routing[-1].numel(), "experts")
    return (x.new_empty(x.shape) if need_dx else absent(x),
            wgrad_like(x, e, hidden, two_i, transposed) if need_dw1 else absent(x),
            x.new_empty(e, two_i) if need_db1 else absent(x))


def _expert_mlp_setup(ctx, inputs, output):
    (x, g, w1, w2, b1, b2, routing, top_k, act, save_h, backend, input_grad, weight_grad,
     fp8) = inputs
    ctx.top_k, ctx.act, ctx.fused, ctx.fp8 = top_k, act, backend == "triton", fp8
    ctx.input_grad, ctx.weight_grad = input_grad, weight_grad
    ctx.n1 = len(w1)
    ctx.transposed = (is_transposed(w1), is_transposed(w2))
    ctx.deferred = (deferred_of(w1), deferred_of(w2))
    ctx.save_for_backward(x, g, b1, b2, output[1] if save_h else None, *routing, *w1, *w2)


def _mode(need: bool, deferred) -> int:
    return WGRAD_SKIP if not need else WGRAD_NOW if deferred is None else WGRAD_DEFER


def _expert_mlp_backward(ctx, dout, _):
    """Two ops: the down projection's backward (``h`` is free once it returns) and the
    gate_up projection's; deferred weight gradients are queued on their WeightGradStore."""
    x, g, b1, b2, h, *rest = ctx.saved_tensors
    routing, w1, w2 = rest[:6], rest[6:6 + ctx.n1], rest[6 + ctx.n1:]
    need_x, need_g, needs_w1, needs_w2, need_b1, need_b2 = needs_input_grad(ctx)[:6]
    need_x = need_x and ctx.input_grad
    need_w1, need_w2 = (any(n) and ctx.weight_grad for n in (needs_w1, needs_w2))
    need_b1, need_b2 = (n and ctx.weight_grad for n in (need_b1, need_b2))
    top_k, fused = ctx.top_k, ctx.fused
    (t1, t2), (defer_w1, defer_w2) = ctx.transposed, ctx.deferred
    r = Routing.from_tensors(routing, top_k)
    dout = dout.contiguous()
    dw2_mode = _mode(need_w2, defer_w2)
    dh, dg, dw2, db2, a_scaled, dy = _down_backward_op(
        dout, x, h, g, w1, b1, w2, b2, routing, top_k, ctx.act, fused, dw2_mode, need_g,
        need_b2, t2, ctx.fp8)
    if h is not None:
        release_saved(h)
    del h
    if dw2_mode == WGRAD_DEFER:
        dy, dy_rows = (dout, r.token_index) if fused else (dy, None)
        stack_weight_grad(defer_w2, True, w2, _wgrad, a_scaled, None, dy, dy_rows, r.offsets,
                          t2, fused)
    del a_scaled, dy
    dw1_mode = _mode(need_w1, defer_w1)
    dx, dw1, db1 = _gate_up_backward_op(dh, x, w1, routing, top_k, fused, need_x,
                                        dw1_mode == WGRAD_NOW, need_b1, t1, ctx.fp8)
    if dw1_mode == WGRAD_DEFER:
        stack_weight_grad(defer_w1, True, w1, _wgrad, x, r.token_index, dh, None, r.offsets,
                          t1, fused)
    return (dx if need_x else None, dg if need_g else None,
            _masked(split_grad(dw1, w1) if dw1_mode == WGRAD_NOW else None, needs_w1),
            _masked(split_grad(dw2, w2) if dw2_mode == WGRAD_NOW else None, needs_w2),
            db1 if need_b1 else None, db2 if need_b2 else None, [None] * len(routing),
            None, None, None, None, None, None, None)


def _masked(grads: list | None, needs: list[bool]) -> list:
    """One entry per list input (the structure autograd expects back), ``None`` where not
    needed."""
    grads = grads or [None] * len(needs)
    return [d if n else None for d, n in zip(grads, needs)]


_expert_mlp_autograd = differentiable(_expert_mlp_op, _expert_mlp_backward, _expert_mlp_setup)


def expert_mlp(
    x: Tensor,
    routing: Routing,
    gate_weights: Tensor,
    w_gate_up: Stack,
    w_down: Stack,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str | Activation = "swiglu",
    save: SaveMode | None = None,
    input_grad: bool | None = None,
    weight_grad: bool | None = None,
    backend: Backend | None = None,
    precision: Precision = "default",
) -> Tensor:
    """Routed expert MLP of ``x [T, H]``, summed over each token's ``top_k`` experts.

    One autograd node that keeps only what backward needs: ``x`` (the caller's tensor, not a
    permuted copy), the routing indices, the sorted router weights and, with ``save="h"``,
    the gate_up output ``h``; the down output is never kept.

    Args:
        routing: from :func:`build_routing` on the router's ``[T, k]`` expert ids.
        gate_weights: router weights ``[T, k]``; receive a gradient when they require one.
        w_gate_up: ``[E, H, 2I]``; w_down: ``[E, I, H]`` (``[E, in, out]`` layout), or each as
            a list of per-expert ``nn.Linear`` weights (``[out, in]``; for gate_up, gate then
            up of each expert), stacked inside the op and never kept stacked.
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
        precision: ``"fp8"`` runs the four forward and dX grouped GEMMs with e4m3 operands
            (rowwise power-of-two scales, fp32 accumulation; :mod:`groupmoe.ops.fp8`): on
            Hopper/Blackwell through ``torch._scaled_grouped_mm``, emulated on CPU, an error
            elsewhere. Weight gradients, the activation, the router weight and the combine
            stay in the input precision; ``h`` is kept as usual. Takes the torch backend.
    Returns:
        ``[T, H]`` in ``x``'s dtype, accumulated over the k slots in fp32.
    """
    save = DEFAULT_SAVE if save is None else save
    check(save in SAVE_MODES, f"expert_mlp: save must be 'h' or 'none' (argument or "
          f"GROUPMOE_SAVE), got {save!r}")
    check(precision in PRECISIONS,
          f"expert_mlp: precision must be one of {PRECISIONS}, got {precision!r}")
    fp8 = precision == "fp8"
    check(not (fp8 and backend == "triton"),
          "expert_mlp: backend='triton' has no FP8 kernels; use precision='fp8' with the "
          "torch or auto backend")
    w1, w2 = as_list(w_gate_up), as_list(w_down)
    act = get_activation(activation)
    check_expert_args(x, routing, gate_weights, w1, w2, b_gate_up, b_down, act)
    w1, _ = defer_stack(w1)
    w2, _ = defer_stack(w2)
    g = gate_weights.reshape(-1).index_select(0, routing.order)
    resolved = "torch" if fp8 else resolve_backend(backend, x, act, b_down is not None)
    out, _ = _expert_mlp_autograd(x, g, w1, w2, b_gate_up, b_down, routing.tensors(),
                                  routing.top_k, act.spec, save == "h", resolved,
                                  input_grad is not False, weight_grad is not False, fp8)
    return out


def expert_mlp_naive(
    x: Tensor,
    routing: Routing,
    gate_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str | Activation = "swiglu",
) -> Tensor:
    """The same math composed from differentiable pieces under plain autograd (the baseline:
    sort, grouped GEMMs, activation, weighted fp32 ``index_add`` combine)."""
    act = get_activation(activation)
    check_expert_args(x, routing, gate_weights, w_gate_up, w_down, b_gate_up, b_down, act)
    xs = x.index_select(0, routing.token_index)
    h = grouped_linear(xs, w_gate_up, routing.offsets, b_gate_up, routing.expert_index)
    y = grouped_linear(act(h), w_down, routing.offsets, b_down, routing.expert_index)
    return combine(y, routing, gate_weights)
