"""Routed expert MLP on frozen base weights that are built a range of experts at a time
(dequantized NF4), with optional grouped LoRA: one custom op forward, one backward.

Rows are sorted by expert, so a range of experts ``[e0, e1)`` owns a contiguous range of rows.
Forward and backward walk the ranges ("chunks"): build the chunk's base weights, run its grouped
GEMMs, drop them. The dense stacks never exist whole, and backward builds each chunk's weights
again (dX through the frozen base needs them). What is kept for backward: ``x`` (the caller's
tensor; permuted rows are gathered again per chunk), the sorted router weights, the gate_up
output ``h`` (``save="h"``; ``"none"`` recomputes it) and the rank-``r`` LoRA intermediates
``x A`` and ``a A`` (``[rows, r]``). Memory beyond that is one chunk's weights and activations,
plus the ``[rows, H]`` down output (forward) and input gradient (backward) that the
deterministic combine needs whole.

The base weights come from a :class:`ChunkedWeights`: the name of a registered weight source
(:func:`register_weight_source`; groupmoe.quant registers ``"nf4"``), its tensors and integer
metadata, so the ops take tensors and numbers only and torch.compile sees two opaque nodes. With
several chunks the plan reads the group ends back once per call (inside the ops); one chunk
(all experts) reads nothing back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..ops.activations import Activation, activation_from_spec, scaled_backward, scaled_forward
from ..ops.checks import check
from ..ops.dtypes import accum_dtype
from ..ops.experts import SaveMode, _gather_sum, bias_prob_grads_rows
from ..ops.grouped_gemm import grouped_mm, grouped_mm_wgrad, segment_sum
from ..ops.library import absent, custom_op, differentiable, needs_input_grad
from ..ops.routing import Routing
from .factors import ExpertLoRA

Tensor = torch.Tensor
# (tensors, meta, e0, e1, dtype) -> frozen weights of experts [e0, e1), [n, in, out]
WeightSource = Callable[[Sequence[Tensor], Sequence[int], int, int, torch.dtype], Tensor]
_SOURCES: dict[str, WeightSource] = {}


def register_weight_source(name: str, build: WeightSource) -> None:
    """Make ``build(tensors, meta, e0, e1, dtype)`` available to :class:`ChunkedWeights` as
    ``source=name``."""
    _SOURCES[name] = build


def _dense_source(tensors, meta, e0, e1, dtype):
    return tensors[0][e0:e1].to(dtype)


register_weight_source("dense", _dense_source)


@dataclass(frozen=True)
class ChunkedWeights:
    """One frozen stack for the chunked op: ``source`` (registered name), its ``tensors`` and
    integer ``meta``; ``shape`` is the ``[E, in, out]`` shape it builds. ``"dense"`` takes one
    ``[E, in, out]`` tensor (any strides) and slices it."""

    source: str
    tensors: tuple[Tensor, ...]
    meta: tuple[int, ...]
    shape: tuple[int, int, int]

    @classmethod
    def dense(cls, w: Tensor) -> ChunkedWeights:
        return cls("dense", (w,), (), tuple(w.shape))

    def experts(self, e0: int, e1: int, dtype: torch.dtype) -> Tensor:
        """The weights of experts ``[e0, e1)``, ``[n, in, out]`` in ``dtype``."""
        check(self.source in _SOURCES, lambda: f"chunked experts: unknown weight source "
              f"{self.source!r}; registered: {sorted(_SOURCES)}")
        return _SOURCES[self.source](self.tensors, self.meta, e0, e1, dtype)


@dataclass(frozen=True)
class Chunk:
    """Experts ``[e0, e1)`` and their sorted rows ``[r0, r1)``; ``offs`` local group ends."""

    e0: int
    e1: int
    r0: int
    r1: int
    offs: Tensor


def plan_chunks(routing: Routing, experts_per_chunk: int) -> list[Chunk]:
    """Split the experts into ranges of at most ``experts_per_chunk`` (balanced), skipping
    ranges without rows. Several ranges cost one host sync (the group ends are read back to
    slice the rows); one range (``experts_per_chunk >= E``) costs none."""
    check(experts_per_chunk >= 1,
          lambda: f"plan_chunks: experts_per_chunk must be >= 1, got {experts_per_chunk}")
    e = routing.num_experts
    n = -(-e // experts_per_chunk)
    if n <= 1:  # all rows, sizes from shapes only: nothing read back
        rows = routing.num_rows
        return [Chunk(0, e, 0, rows, routing.offsets)] if rows and e else []
    per = -(-e // n)
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
    weights: tuple[ChunkedWeights, ChunkedWeights]
    dtype: torch.dtype
    act: Activation
    scales: tuple[float, float]

    def make(self, which: int, c: Chunk) -> Tensor:
        return self.weights[which].experts(c.e0, c.e1, self.dtype)


def _factor(t: Tensor | None, c: Chunk, dtype: torch.dtype) -> Tensor | None:
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


def _weights_of(tensors, meta, source, shape) -> ChunkedWeights:
    return ChunkedWeights(source, tuple(tensors), tuple(meta), tuple(shape))


def _plan(x, w1, w2, experts_per_chunk, routing, top_k, act, s1, s2) -> _Plan:
    r = Routing.from_tensors(routing, top_k)
    return _Plan(r, plan_chunks(r, experts_per_chunk), (w1, w2), x.dtype,
                 activation_from_spec(act), (s1, s2))


def _put(buf: Tensor, part: Tensor, c: Chunk, whole: bool) -> Tensor:
    """``part`` (chunk ``c``'s rows) into ``buf``; with one chunk holding every row ``part`` is
    the result itself (no buffer, no copy)."""
    if whole:
        return part
    buf[c.r0:c.r1] = part
    return buf


def _rank(t: Tensor | None) -> int:
    return 0 if t is None else t.shape[-1]


@custom_op("chunked_expert_mlp")
def _chunked_forward_op(
    x: Tensor, g: Tensor, w1_tensors: Sequence[Tensor], w1_meta: Sequence[int], w1_source: str,
    w1_shape: Sequence[int], w2_tensors: Sequence[Tensor], w2_meta: Sequence[int],
    w2_source: str, w2_shape: Sequence[int], experts_per_chunk: int, b1: Tensor | None,
    b2: Tensor | None, a1: Tensor | None, lb1: Tensor | None, a2: Tensor | None,
    lb2: Tensor | None, routing: Sequence[Tensor], top_k: int, act: str, save_h: bool,
    s1: float, s2: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, h, x A1, a A2)`` (absent where not kept) of the chunked expert MLP."""
    plan = _plan(x, _weights_of(w1_tensors, w1_meta, w1_source, w1_shape),
                 _weights_of(w2_tensors, w2_meta, w2_source, w2_shape), experts_per_chunk,
                 routing, top_k, act, s1, s2)
    routing_, act_ = plan.routing, plan.act
    n = routing_.num_rows
    # one chunk holds every row (whole stacks, the default): its tensors are the results, no
    # copies into buffers
    whole = len(plan.chunks) == 1
    y = x.new_empty(0 if whole else n, x.shape[1])
    h_all = x.new_empty(0 if whole else n, w1_shape[2]) if save_h else absent(x)
    u_all = x.new_empty(0 if whole else n, _rank(a1)) if a1 is not None else absent(x)
    v_all = x.new_empty(0 if whole else n, _rank(a2)) if a2 is not None else absent(x)
    for c in plan.chunks:
        g_c = g[c.r0:c.r1]
        xs = x.index_select(0, routing_.token_index[c.r0:c.r1])
        h, u = _gate_up(plan, c, xs, plan.make(0, c), b1, a1, lb1)
        del xs
        a = scaled_forward(act_, h, g_c)
        y_c = grouped_mm(a, plan.make(1, c), c.offs)
        if a2 is not None:
            v = grouped_mm(a, _factor(a2, c, x.dtype), c.offs)
            y_c += grouped_mm(v, _factor(lb2, c, x.dtype), c.offs).mul_(s2)
        else:
            v = None
        del a
        if b2 is not None:
            idx = routing_.expert_index[c.r0:c.r1]
            y_c += g_c.to(y_c.dtype).unsqueeze(1) * b2.index_select(0, idx)
        y = _put(y, y_c, c, whole)
        h_all = _put(h_all, h, c, whole) if save_h else h_all
        u_all = _put(u_all, u, c, whole) if u is not None else u_all
        v_all = _put(v_all, v, c, whole) if v is not None else v_all
        del y_c, h, u, v
    return _gather_sum(y, routing_, x.dtype), h_all, u_all, v_all


@_chunked_forward_op.register_fake
def _(x, g, w1_tensors, w1_meta, w1_source, w1_shape, w2_tensors, w2_meta, w2_source, w2_shape,
      experts_per_chunk, b1, b2, a1, lb1, a2, lb2, routing, top_k, act, save_h, s1, s2):
    n = routing[0].numel()
    return (x.new_empty(x.shape), x.new_empty(n, w1_shape[2]) if save_h else absent(x),
            x.new_empty(n, _rank(a1)) if a1 is not None else absent(x),
            x.new_empty(n, _rank(a2)) if a2 is not None else absent(x))


@custom_op("chunked_expert_mlp_backward")
def _chunked_backward_op(
    dout: Tensor, x: Tensor, g: Tensor, w1_tensors: Sequence[Tensor], w1_meta: Sequence[int],
    w1_source: str, w1_shape: Sequence[int], w2_tensors: Sequence[Tensor],
    w2_meta: Sequence[int], w2_source: str, w2_shape: Sequence[int], experts_per_chunk: int,
    b1: Tensor | None, b2: Tensor | None, a1: Tensor | None, lb1: Tensor | None,
    a2: Tensor | None, lb2: Tensor | None, h_all: Tensor | None, u_all: Tensor | None,
    v_all: Tensor | None, routing: Sequence[Tensor], top_k: int, act: str, s1: float,
    s2: float, needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(x, g, b1, b2, a1, lb1, a2, lb2)`` (absent where not ``needs``)."""
    plan = _plan(x, _weights_of(w1_tensors, w1_meta, w1_source, w1_shape),
                 _weights_of(w2_tensors, w2_meta, w2_source, w2_shape), experts_per_chunk,
                 routing, top_k, act, s1, s2)
    routing_, act_ = plan.routing, plan.act
    need_x, need_g, need_b1, need_b2 = needs[:4]
    dt = x.dtype
    acc = accum_dtype(dt)
    dout = dout.contiguous()
    whole = len(plan.chunks) == 1  # as in the forward: the chunk's row tensors are the results
    rows = 0 if whole else routing_.num_rows
    dxs = x.new_empty(rows, x.shape[1]) if need_x else None
    dg = torch.zeros(rows, dtype=acc, device=x.device) if need_g else None
    db1 = torch.zeros(b1.shape, dtype=acc, device=x.device) if need_b1 else None
    db2 = torch.zeros(b2.shape, dtype=acc, device=x.device) if need_b2 else None
    lora_grads = [torch.zeros(t.shape, dtype=dt, device=x.device) if t is not None and n
                  else None for t, n in zip((a1, lb1, a2, lb2), needs[4:8])]
    da1, dlb1, da2, dlb2 = lora_grads
    for c in plan.chunks:
        tok = routing_.token_index[c.r0:c.r1]
        idx = routing_.expert_index[c.r0:c.r1] - c.e0
        g_c = g[c.r0:c.r1]
        dy = dout.index_select(0, tok)
        da = grouped_mm(dy, plan.make(1, c).transpose(-1, -2), c.offs)
        dv = None
        if a2 is not None:
            if dlb2 is not None:
                dlb2[c.e0:c.e1] = grouped_mm_wgrad(v_all[c.r0:c.r1], dy, c.offs).mul_(s2)
            dv = grouped_mm(dy, _factor(lb2, c, dt).transpose(-1, -2), c.offs).mul_(s2)
            da += grouped_mm(dv, _factor(a2, c, dt).transpose(-1, -2), c.offs)
        if b2 is not None and (need_g or need_b2):
            db2_c, dprob = bias_prob_grads_rows(dy, g_c, b2[c.e0:c.e1], c.offs, idx)
            if need_b2:
                db2[c.e0:c.e1] = db2_c
        del dy
        w1 = xs = None
        if h_all is None:  # save="none": rebuild h (and keep this chunk's W1 for dX)
            w1 = plan.make(0, c)
            xs = x.index_select(0, tok)
            h, _ = _gate_up(plan, c, xs, w1, b1, None, None)
            if a1 is not None:
                h += grouped_mm(u_all[c.r0:c.r1], _factor(lb1, c, dt), c.offs).mul_(s1)
        else:
            h = h_all[c.r0:c.r1]
        dh, a_scaled, dg_c = scaled_backward(act_, h, g_c, da, da2 is not None, need_g)
        del h, da
        if da2 is not None:
            da2[c.e0:c.e1] = grouped_mm_wgrad(a_scaled, dv, c.offs)
        del a_scaled, dv
        if need_g:
            dg = _put(dg, dg_c + dprob if b2 is not None else dg_c, c, whole)
        if need_b1:
            db1[c.e0:c.e1] = segment_sum(dh, idx, c.e1 - c.e0, c.offs)
        du = None
        if a1 is not None:
            if dlb1 is not None:
                dlb1[c.e0:c.e1] = grouped_mm_wgrad(u_all[c.r0:c.r1], dh, c.offs).mul_(s1)
            du = grouped_mm(dh, _factor(lb1, c, dt).transpose(-1, -2), c.offs).mul_(s1)
            if da1 is not None:
                xs = x.index_select(0, tok) if xs is None else xs
                da1[c.e0:c.e1] = grouped_mm_wgrad(xs, du, c.offs)
        del xs
        if need_x:
            w1 = plan.make(0, c) if w1 is None else w1
            dxs_c = grouped_mm(dh, w1.transpose(-1, -2), c.offs)
            if du is not None:
                dxs_c += grouped_mm(du, _factor(a1, c, dt).transpose(-1, -2), c.offs)
            dxs = _put(dxs, dxs_c, c, whole)
            del dxs_c
        del w1, dh, du
    grads = [_gather_sum(dxs, routing_, dt) if need_x else None,
             dg.to(g.dtype) if need_g else None]
    grads += [None if t is None or d is None else d.to(t.dtype)
              for t, d in zip((b1, b2, a1, lb1, a2, lb2), (db1, db2, *lora_grads))]
    return tuple(absent(x) if d is None else d for d in grads)


@_chunked_backward_op.register_fake
def _(dout, x, g, w1_tensors, w1_meta, w1_source, w1_shape, w2_tensors, w2_meta, w2_source,
      w2_shape, experts_per_chunk, b1, b2, a1, lb1, a2, lb2, h_all, u_all, v_all, routing,
      top_k, act, s1, s2, needs):
    like = (x, g, b1, b2, a1, lb1, a2, lb2)
    return tuple(t.new_empty(t.shape) if t is not None and n else absent(x)
                 for t, n in zip(like, needs))


_OPTIONAL = ("b1", "b2", "a1", "lb1", "a2", "lb2")


def _setup(ctx, inputs, output):
    (x, g, w1t, w1m, w1s, w1shape, w2t, w2m, w2s, w2shape, per, b1, b2, a1, lb1, a2, lb2,
     routing, top_k, act, save_h, s1, s2) = inputs
    ctx.consts = (w1m, w1s, w1shape, w2m, w2s, w2shape, per, top_k, act, s1, s2)
    ctx.n1, ctx.n2, ctx.save_h = len(w1t), len(w2t), save_h
    _, h, u, v = output
    ctx.save_for_backward(x, g, b1, b2, a1, lb1, a2, lb2, h if save_h else None,
                          u if a1 is not None else None, v if a2 is not None else None,
                          *routing, *w1t, *w2t)


def _backward(ctx, dout, *_):
    x, g, b1, b2, a1, lb1, a2, lb2, h, u, v, *rest = ctx.saved_tensors
    routing, w1t, w2t = rest[:6], rest[6:6 + ctx.n1], rest[6 + ctx.n1:]
    w1m, w1s, w1shape, w2m, w2s, w2shape, per, top_k, act, s1, s2 = ctx.consts
    need = needs_input_grad(ctx)
    needs = [need[0], need[1], *need[11:17]]
    grads = _chunked_backward_op(dout, x, g, w1t, w1m, w1s, w1shape, w2t, w2m, w2s, w2shape,
                                 per, b1, b2, a1, lb1, a2, lb2, h, u, v, routing, top_k, act,
                                 s1, s2, needs)
    dx, dg, *opt = (d if n else None for d, n in zip(grads, needs))
    # an empty int list (the dense source's meta) is a list to the op's pytree, not a leaf
    return (dx, dg, [None] * ctx.n1, [] if not w1m else None, None, None, [None] * ctx.n2,
            [] if not w2m else None, None, None, None, *opt, [None] * 6, None, None, None, None,
            None)


_chunked_autograd = differentiable(_chunked_forward_op, _backward, _setup)


def chunked_expert_mlp(
    x: Tensor,
    routing: Routing,
    gate_weights: Tensor,
    w_gate_up: ChunkedWeights,
    w_down: ChunkedWeights,
    experts_per_chunk: int,
    act: Activation,
    lora: ExpertLoRA | None = None,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    save: SaveMode = "h",
) -> Tensor:
    """Routed expert MLP (the contract of :func:`groupmoe.ops.expert_mlp`) on frozen base
    weights built ``experts_per_chunk`` experts at a time from ``w_gate_up``/``w_down``
    (:class:`ChunkedWeights`, ``[E, in, out]``), forward and backward, plus optional LoRA
    (gradients reach ``x``, the router weights, the biases and the LoRA factors; never the
    base weights).

    ``save="h"`` keeps the gate_up output for backward; ``"none"`` recomputes it from the
    chunk's weights (which backward builds anyway for dX).
    """
    check(save in ("h", "none"),
          lambda: f"chunked_expert_mlp: save must be 'h' or 'none', got {save!r}")
    check(x.dim() == 2,
          lambda: f"chunked_expert_mlp: x must be [tokens, hidden], got {tuple(x.shape)}")
    t = x.shape[0]
    check(routing.num_tokens == t or routing.num_rows == 0,
          lambda: f"chunked_expert_mlp: routing is for {routing.num_tokens} tokens, x has {t}")
    check(gate_weights.shape == (t, routing.top_k),
          lambda: f"chunked_expert_mlp: router weights must be [{t}, {routing.top_k}], got "
          f"{tuple(gate_weights.shape)}")
    lora = lora or ExpertLoRA()
    gu, dn = lora.gate_up, lora.down
    g = gate_weights.reshape(-1).index_select(0, routing.order)
    w1, w2 = w_gate_up, w_down
    out, *_ = _chunked_autograd(
        x, g, list(w1.tensors), list(w1.meta), w1.source, list(w1.shape), list(w2.tensors),
        list(w2.meta), w2.source, list(w2.shape), experts_per_chunk, b_gate_up, b_down,
        gu.a if gu else None, gu.b if gu else None, dn.a if dn else None, dn.b if dn else None,
        routing.tensors(), routing.top_k, act.spec, save == "h",
        float(gu.scale if gu else 1.0), float(dn.scale if dn else 1.0))
    return out
