"""Routed expert MLP on frozen base weights that are built a range of experts at a time
(dequantized NF4), with optional grouped LoRA: one autograd node.

Rows are sorted by expert, so a range of experts ``[e0, e1)`` owns a contiguous range of rows.
Forward and backward walk the ranges ("chunks"): build the chunk's base weights, run its grouped
GEMMs, drop them. The dense stacks never exist whole, and backward builds each chunk's weights
again (dX through the frozen base needs them). What is kept for backward: ``x`` (the caller's
tensor; permuted rows are gathered again per chunk), the sorted router weights, the gate_up
output ``h`` (``save="h"``; ``"none"`` recomputes it) and the rank-``r`` LoRA intermediates
``x A`` and ``a A`` (``[rows, r]``). Memory beyond that is one chunk's weights and activations,
plus the ``[rows, H]`` down output (forward) and input gradient (backward) that the
deterministic combine needs whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.activations import Activation, scaled_backward, scaled_forward
from ..ops.checks import check
from ..ops.dtypes import accum_dtype
from ..ops.experts import SaveMode, _gather_sum, bias_prob_grads_rows
from ..ops.grouped_gemm import grouped_mm, grouped_mm_wgrad, segment_sum
from ..ops.routing import Routing
from .experts import ExpertLoRA

# (which, e0, e1) -> frozen weights of experts [e0, e1) in [n, in, out] layout, compute dtype;
# which is "gate_up" or "down".
WeightMaker = Callable[[str, int, int], torch.Tensor]


@dataclass(frozen=True)
class Chunk:
    """Experts ``[e0, e1)`` and their sorted rows ``[r0, r1)``; ``offs`` local group ends."""

    e0: int
    e1: int
    r0: int
    r1: int
    offs: torch.Tensor


def plan_chunks(routing: Routing, experts_per_chunk: int) -> list[Chunk]:
    """Split the experts into ranges of at most ``experts_per_chunk`` (balanced), skipping
    ranges without rows. One host sync (the group ends)."""
    check(experts_per_chunk >= 1,
          f"plan_chunks: experts_per_chunk must be >= 1, got {experts_per_chunk}")
    e = routing.num_experts
    n = -(-e // experts_per_chunk)
    per = -(-e // n) if n else 0
    ends = routing.offsets.tolist()
    chunks = []
    for e0 in range(0, e, max(per, 1)):
        e1 = min(e0 + per, e)
        r0, r1 = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
        if r1 > r0:
            chunks.append(Chunk(e0, e1, r0, r1, routing.offsets[e0:e1] - r0))
    return chunks


@dataclass
class _Plan:
    routing: Routing
    chunks: list[Chunk]
    make: WeightMaker
    act: Activation
    save: SaveMode
    scales: tuple[float, float]


def _factor(t: torch.Tensor | None, c: Chunk, dtype: torch.dtype) -> torch.Tensor | None:
    # small (rank r): the dense layout grouped_mm accepts (peft's factors are permuted views)
    return None if t is None else t[c.e0:c.e1].to(dtype).contiguous()


def _gate_up(plan: _Plan, c: Chunk, xs, w1, b1, a1, lb1):
    """``h = xs W1 + b1 + s1 (xs A1) B1`` of one chunk; returns ``(h, xs A1)``."""
    h = grouped_mm(xs, w1, c.offs)
    if b1 is not None:
        h += b1.index_select(0, plan.routing.expert_index[c.r0:c.r1])
    u = None
    if a1 is not None:
        u = grouped_mm(xs, _factor(a1, c, xs.dtype), c.offs)
        h += grouped_mm(u, _factor(lb1, c, xs.dtype), c.offs).mul_(plan.scales[0])
    return h, u


class ChunkedExpertFunction(torch.autograd.Function):
    """See the module docstring. Inputs: ``x, gate_weights`` and the optional frozen-base biases
    and LoRA factors (``a1 [E, H, r]``, ``lb1 [E, r, 2I]``, ``a2 [E, I, r]``, ``lb2 [E, r, H]``),
    all of which may require grad."""

    @staticmethod
    def forward(ctx, x, gate_weights, b1, b2, a1, lb1, a2, lb2, plan: _Plan):
        routing, act = plan.routing, plan.act
        g = gate_weights.reshape(-1).index_select(0, routing.order)
        y = x.new_empty(routing.num_rows, x.shape[1])
        hs, us, vs = [], [], []
        for c in plan.chunks:
            g_c = g[c.r0:c.r1]
            xs = x.index_select(0, routing.token_index[c.r0:c.r1])
            h, u = _gate_up(plan, c, xs, plan.make("gate_up", c.e0, c.e1), b1, a1, lb1)
            del xs
            a = scaled_forward(act, h, g_c)
            y_c = grouped_mm(a, plan.make("down", c.e0, c.e1), c.offs)
            v = None
            if a2 is not None:
                v = grouped_mm(a, _factor(a2, c, x.dtype), c.offs)
                y_c += grouped_mm(v, _factor(lb2, c, x.dtype), c.offs).mul_(plan.scales[1])
            del a
            if b2 is not None:
                idx = routing.expert_index[c.r0:c.r1]
                y_c += g_c.to(y_c.dtype).unsqueeze(1) * b2.index_select(0, idx)
            y[c.r0:c.r1] = y_c
            del y_c
            hs.append(h if plan.save == "h" else None)
            us.append(u)
            vs.append(v)
            del h
        out = _gather_sum(y, routing, x.dtype)
        ctx.plan, ctx.gate_dtype = plan, gate_weights.dtype
        ctx.save_for_backward(x, g, b1, b2, a1, lb1, a2, lb2)
        # intermediates (not inputs/outputs): held on ctx so backward frees them chunk by chunk
        ctx.hs, ctx.us, ctx.vs = hs, us, vs
        return out

    @staticmethod
    def backward(ctx, dout):
        x, g, b1, b2, a1, lb1, a2, lb2 = ctx.saved_tensors
        plan = ctx.plan
        routing, act = plan.routing, plan.act
        s1, s2 = plan.scales
        hs, us, vs = ctx.hs, ctx.us, ctx.vs
        ctx.hs = ctx.us = ctx.vs = None
        need = ctx.needs_input_grad
        need_x, need_g, need_b1, need_b2 = need[0], need[1], need[2], need[3]
        dt = x.dtype
        dout = dout.contiguous()
        dxs = x.new_empty(routing.num_rows, x.shape[1]) if need_x else None
        dg = torch.zeros(routing.num_rows, dtype=accum_dtype(dt), device=x.device) \
            if need_g else None
        acc = accum_dtype(dt)
        db1 = torch.zeros(b1.shape, dtype=acc, device=x.device) if need_b1 else None
        db2 = torch.zeros(b2.shape, dtype=acc, device=x.device) if need_b2 else None
        lora_grads = [torch.zeros(t.shape, dtype=dt, device=x.device) if t is not None and n
                      else None for t, n in zip((a1, lb1, a2, lb2), need[4:8])]
        da1, dlb1, da2, dlb2 = lora_grads
        for i, c in enumerate(plan.chunks):
            tok = routing.token_index[c.r0:c.r1]
            idx = routing.expert_index[c.r0:c.r1] - c.e0
            g_c = g[c.r0:c.r1]
            dy = dout.index_select(0, tok)
            da = grouped_mm(dy, plan.make("down", c.e0, c.e1).transpose(-1, -2), c.offs)
            dv = None
            if a2 is not None:
                v, vs[i] = vs[i], None
                if dlb2 is not None:
                    dlb2[c.e0:c.e1] = grouped_mm_wgrad(v, dy, c.offs).mul_(s2)
                del v
                dv = grouped_mm(dy, _factor(lb2, c, dt).transpose(-1, -2), c.offs).mul_(s2)
                da += grouped_mm(dv, _factor(a2, c, dt).transpose(-1, -2), c.offs)
            if b2 is not None and (need_g or need_b2):
                db2_c, dprob = bias_prob_grads_rows(dy, g_c, b2[c.e0:c.e1], c.offs, idx)
                if need_b2:
                    db2[c.e0:c.e1] = db2_c
            del dy
            h, hs[i] = hs[i], None
            w1 = None
            xs = None
            if h is None:  # save="none": rebuild h (and keep this chunk's W1 for dX)
                w1 = plan.make("gate_up", c.e0, c.e1)
                xs = x.index_select(0, tok)
                h, _ = _gate_up(plan, c, xs, w1, b1, None, None)
                if a1 is not None:
                    h += grouped_mm(us[i], _factor(lb1, c, dt), c.offs).mul_(s1)
            dh, a_scaled, dg_c = scaled_backward(act, h, g_c, da, da2 is not None, need_g)
            del h, da
            if da2 is not None:
                da2[c.e0:c.e1] = grouped_mm_wgrad(a_scaled, dv, c.offs)
            del a_scaled, dv
            if need_g:
                dg[c.r0:c.r1] = dg_c + dprob if b2 is not None else dg_c
            if need_b1:
                db1[c.e0:c.e1] = segment_sum(dh, idx, c.e1 - c.e0, c.offs)
            du = None
            if a1 is not None:
                u, us[i] = us[i], None
                if dlb1 is not None:
                    dlb1[c.e0:c.e1] = grouped_mm_wgrad(u, dh, c.offs).mul_(s1)
                del u
                du = grouped_mm(dh, _factor(lb1, c, dt).transpose(-1, -2), c.offs).mul_(s1)
                if da1 is not None:
                    xs = x.index_select(0, tok) if xs is None else xs
                    da1[c.e0:c.e1] = grouped_mm_wgrad(xs, du, c.offs)
            del xs
            if need_x:
                w1 = plan.make("gate_up", c.e0, c.e1) if w1 is None else w1
                dxs_c = grouped_mm(dh, w1.transpose(-1, -2), c.offs)
                if du is not None:
                    dxs_c += grouped_mm(du, _factor(a1, c, dt).transpose(-1, -2), c.offs)
                dxs[c.r0:c.r1] = dxs_c
                del dxs_c
            del w1, dh, du
        dx = _gather_sum(dxs, routing, dt) if need_x else None
        dgate = None
        if need_g:
            dgate = torch.empty_like(dg).index_copy_(0, routing.order, dg)
            dgate = dgate.view(routing.num_tokens, routing.top_k).to(ctx.gate_dtype)
        grads = [None if t is None or d is None else d.to(t.dtype)
                 for t, d in zip((b1, b2, a1, lb1, a2, lb2), (db1, db2, *lora_grads))]
        return (dx, dgate, *grads, None)


def chunked_expert_mlp(
    x: torch.Tensor,
    routing: Routing,
    gate_weights: torch.Tensor,
    make_weights: WeightMaker,
    experts_per_chunk: int,
    act: Activation,
    lora: ExpertLoRA | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    save: SaveMode = "h",
) -> torch.Tensor:
    """Routed expert MLP (the contract of :func:`groupmoe.ops.expert_mlp`) on frozen base
    weights built by ``make_weights(which, e0, e1)`` a range of ``experts_per_chunk`` experts
    at a time, forward and backward, plus optional LoRA (gradients reach ``x``, the router
    weights, the biases and the LoRA factors; never the base weights).

    ``save="h"`` keeps the gate_up output for backward; ``"none"`` recomputes it from the
    chunk's weights (which backward builds anyway for dX).
    """
    check(save in ("h", "none"), f"chunked_expert_mlp: save must be 'h' or 'none', got {save!r}")
    check(x.dim() == 2, f"chunked_expert_mlp: x must be [tokens, hidden], got {tuple(x.shape)}")
    t = x.shape[0]
    check(routing.num_tokens == t or routing.num_rows == 0,
          f"chunked_expert_mlp: routing is for {routing.num_tokens} tokens, x has {t}")
    check(gate_weights.shape == (t, routing.top_k),
          f"chunked_expert_mlp: router weights must be [{t}, {routing.top_k}], got "
          f"{tuple(gate_weights.shape)}")
    lora = lora or ExpertLoRA()
    gu, dn = lora.gate_up, lora.down
    plan = _Plan(routing, plan_chunks(routing, experts_per_chunk), make_weights, act, save,
                 (gu.scale if gu else 1.0, dn.scale if dn else 1.0))
    return ChunkedExpertFunction.apply(
        x, gate_weights, b_gate_up, b_down, gu.a if gu else None, gu.b if gu else None,
        dn.a if dn else None, dn.b if dn else None, plan)
