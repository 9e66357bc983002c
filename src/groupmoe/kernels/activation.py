"""Fused expert activation with router-weight scaling, forward and backward, one pass each,
for every :class:`~groupmoe.ops.activations.Activation` (function, gate layout, clamps and
offset are compile-time flags of one templated kernel).

Forward:  ``a' = g * act(h)``.
Backward: from ``h``, ``g`` and ``da' = dy W_down^T``: ``dh = act'(h) * (g * da')``,
``dg = <da', act(h)>`` (fp32, one program per row block, no atomics: deterministic) and
optionally ``a'`` again for the down projection's weight gradient. Math in fp32 registers,
rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SWIGLU, GPTOSS = 0, 1  # the forms of the fused-GEMM epilogues (grouped_bwd.py)
CONCAT, INTERLEAVED, UNGATED = 0, 1, 2  # where gate and up sit in h
# Activation.fn -> the FN flag of _fn_and_grad
_FN_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "relu2": 4, "sigmoid_alpha": 5}
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _fn_and_grad(x, FN: tl.constexpr, alpha):
    """``(fn(x), fn'(x))`` in fp32 (FN from ``_FN_CODES``)."""
    if FN == 0:  # silu
        s = tl.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    elif FN == 1:  # gelu, tanh approximation: 0.5 (1 + tanh(z)) = sigmoid(2 z)
        z = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        half = tl.sigmoid(2.0 * z)  # 0.5 * (1 + tanh(z))
        t = 2.0 * half - 1.0
        dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return x * half, half + 0.5 * x * (1.0 - t * t) * dz
    elif FN == 2:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif FN == 3:  # relu
        return tl.maximum(x, 0.0), tl.where(x > 0.0, 1.0, 0.0)
    elif FN == 4:  # relu2
        r = tl.maximum(x, 0.0)
        return r * r, 2.0 * r
    else:  # sigmoid_alpha: x sigmoid(alpha x)
        s = tl.sigmoid(alpha * x)
        return x * s, s + alpha * x * s * (1.0 - s)


@triton.jit
def _clamped(gate, up, HAS_GATE_LIMIT: tl.constexpr, HAS_UP_LIMIT: tl.constexpr,
             UP_PLUS_ONE: tl.constexpr, gate_limit, up_limit):
    gc = gate
    if HAS_GATE_LIMIT:
        gc = tl.minimum(gate, gate_limit)
    uc = up
    if HAS_UP_LIMIT:
        uc = tl.minimum(tl.maximum(up, -up_limit), up_limit)
    if UP_PLUS_ONE:
        uc = uc + 1.0
    return gc, uc


@triton.jit
def act_value(gate, up, FN: tl.constexpr, GATED: tl.constexpr, HAS_GATE_LIMIT: tl.constexpr,
              HAS_UP_LIMIT: tl.constexpr, UP_PLUS_ONE: tl.constexpr, alpha, gate_limit,
              up_limit):
    """The activation of fp32 ``gate`` (and ``up`` when GATED), in fp32."""
    gc, uc = _clamped(gate, up, HAS_GATE_LIMIT, HAS_UP_LIMIT, UP_PLUS_ONE, gate_limit,
                      up_limit)
    f, _ = _fn_and_grad(gc, FN, alpha)
    if GATED:
        f = f * uc
    return f


@triton.jit
def act_grad(gate, up, da, FN: tl.constexpr, GATED: tl.constexpr,
             HAS_GATE_LIMIT: tl.constexpr, HAS_UP_LIMIT: tl.constexpr,
             UP_PLUS_ONE: tl.constexpr, alpha, gate_limit, up_limit):
    """``(act, dgate, dup)`` in fp32 for ``da``, the gradient of the (unscaled) activation
    output (``dup`` is ``dgate`` when not GATED). Clamps pass gradient only inside their range,
    bounds included (torch's convention)."""
    gc, uc = _clamped(gate, up, HAS_GATE_LIMIT, HAS_UP_LIMIT, UP_PLUS_ONE, gate_limit,
                      up_limit)
    f, fp = _fn_and_grad(gc, FN, alpha)
    if GATED:
        a = f * uc
        dgate = da * uc * fp
        dup = da * f
        if HAS_UP_LIMIT:
            dup = tl.where((up >= -up_limit) & (up <= up_limit), dup, 0.0)
    else:
        a = f
        dgate = da * fp
        dup = dgate
    if HAS_GATE_LIMIT:
        dgate = tl.where(gate <= gate_limit, dgate, 0.0)
    return a, dgate, dup


@triton.jit
def act_backward(gate, up, da, KIND: tl.constexpr, alpha, limit):
    """:func:`act_grad` for the fused-GEMM epilogues' two forms: swiglu (KIND 0) and gpt-oss
    (KIND 1: sigmoid_alpha of the gate clamped from above, up clamped, plus one)."""
    if KIND == 0:
        return act_grad(gate, up, da, 0, True, False, False, False, alpha, limit, limit)
    return act_grad(gate, up, da, 5, True, True, True, True, alpha, limit, limit)


@triton.jit
def _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, LAYOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``(gate, up)`` tiles of act-output columns ``col0 + [0, BLOCK_N)``. CONCAT: the two
    halves of ``h``; INTERLEAVED (gpt-oss): read as one contiguous ``[BLOCK_M, 2 * BLOCK_N]``
    tile and split in registers (two stride-2 loads ran at a fifth of the bandwidth); UNGATED:
    ``h`` is the up projection itself (``up`` is the same tile, unused)."""
    base = h_ptr + row * stride_h
    if LAYOUT == 1:
        hc = 2 * col0 + tl.arange(0, 2 * BLOCK_N)
        mask = row_mask[:, None] & (hc[None, :] < 2 * inter)
        hv = tl.load(base + hc[None, :], mask=mask, other=0.0).to(tl.float32)
        return tl.split(tl.reshape(hv, (BLOCK_M, BLOCK_N, 2)))
    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (offs_n[None, :] < inter)
    gate = tl.load(base + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if LAYOUT == 2:
        return gate, gate
    up = tl.load(base + inter + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return gate, up


@triton.jit
def _store_gate_up(ptr, row, stride, col0, row_mask, inter, dgate, dup, LAYOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``(dgate, dup)`` where :func:`_load_gate_up` read ``(gate, up)``."""
    base = ptr + row * stride
    out_ty = ptr.dtype.element_ty
    if LAYOUT == 1:
        hc = 2 * col0 + tl.arange(0, 2 * BLOCK_N)
        mask = row_mask[:, None] & (hc[None, :] < 2 * inter)
        tl.store(base + hc[None, :],
                 tl.reshape(tl.join(dgate, dup), (BLOCK_M, 2 * BLOCK_N)).to(out_ty), mask=mask)
    else:
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n[None, :] < inter)
        tl.store(base + offs_n[None, :], dgate.to(out_ty), mask=mask)
        if LAYOUT == 0:
            tl.store(base + inter + offs_n[None, :], dup.to(out_ty), mask=mask)


@triton.jit
def _fwd_kernel(h_ptr, g_ptr, out_ptr, M, inter, stride_h, stride_o, alpha, gate_limit,
                up_limit, FN: tl.constexpr, LAYOUT: tl.constexpr, HAS_GATE_LIMIT: tl.constexpr,
                HAS_UP_LIMIT: tl.constexpr, UP_PLUS_ONE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    row = offs_m[:, None].to(tl.int64)
    gate, up = _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, LAYOUT, BLOCK_M,
                             BLOCK_N)
    g = tl.load(g_ptr + offs_m, mask=row_mask, other=0.0).to(tl.float32)
    a = act_value(gate, up, FN, LAYOUT != 2, HAS_GATE_LIMIT, HAS_UP_LIMIT, UP_PLUS_ONE, alpha,
                  gate_limit, up_limit) * g[:, None]
    tl.store(out_ptr + row * stride_o + offs_n[None, :], a.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_n[None, :] < inter))


@triton.jit
def _bwd_kernel(h_ptr, g_ptr, da_ptr, dh_ptr, a_ptr, dg_ptr, M, inter, stride_h, stride_da,
                stride_dh, stride_a, alpha, gate_limit, up_limit, FN: tl.constexpr,
                LAYOUT: tl.constexpr, HAS_GATE_LIMIT: tl.constexpr, HAS_UP_LIMIT: tl.constexpr,
                UP_PLUS_ONE: tl.constexpr, STORE_A: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    row = offs_m[:, None].to(tl.int64)
    g = tl.load(g_ptr + offs_m, mask=row_mask, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col0 in range(0, inter, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n[None, :] < inter)
        gate, up = _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, LAYOUT, BLOCK_M,
                                 BLOCK_N)
        da_s = tl.load(da_ptr + row * stride_da + offs_n[None, :], mask=mask, other=0.0)
        da_s = da_s.to(tl.float32)
        a, dgate, dup = act_grad(gate, up, da_s * g[:, None], FN, LAYOUT != 2, HAS_GATE_LIMIT,
                                 HAS_UP_LIMIT, UP_PLUS_ONE, alpha, gate_limit, up_limit)
        dg += tl.sum(da_s * a, axis=1)
        _store_gate_up(dh_ptr, row, stride_dh, col0, row_mask, inter, dgate, dup, LAYOUT,
                       BLOCK_M, BLOCK_N)
        if STORE_A:
            tl.store(a_ptr + row * stride_a + offs_n[None, :],
                     (a * g[:, None]).to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs_m, dg, mask=row_mask)


def act_kind(act) -> tuple[int, float, float]:
    """The fused-GEMM epilogues' form of ``act`` (swiglu or gpt-oss) and its alpha and limit."""
    if act.name == "swiglu":
        return SWIGLU, 0.0, 0.0
    if act.name == "gptoss":
        return GPTOSS, float(act.alpha), float(act.gate_limit)
    raise ValueError(f"no fused kernel for activation {act.name!r}")


def _act_args(act) -> tuple[tuple[float, float, float], dict]:
    """Runtime ``(alpha, gate_limit, up_limit)`` and the constexpr flags of any
    :class:`~groupmoe.ops.activations.Activation` (computed in fp32 registers whatever its
    ``fp32`` says)."""
    layout = UNGATED if not act.gated else INTERLEAVED if act.layout == "interleaved" else CONCAT
    flags = dict(FN=_FN_CODES[act.fn], LAYOUT=layout, HAS_GATE_LIMIT=act.gate_limit is not None,
                 HAS_UP_LIMIT=act.up_limit is not None, UP_PLUS_ONE=act.up_plus_one)
    return (float(act.alpha), float(act.gate_limit or 0.0), float(act.up_limit or 0.0)), flags


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def act_scaled_forward(act, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * act(h)`` in one pass; ``h [M, 2I]`` (``[M, I]`` without a gate),
    ``g [M]``."""
    scalars, flags = _act_args(act)
    h = _rowmajor(h)
    m, i = h.shape[0], act.out_width(h.shape[1])
    out = torch.empty(m, i, dtype=h.dtype, device=h.device)
    if m == 0 or i == 0:
        return out
    grid = (triton.cdiv(m, 32), triton.cdiv(i, 128))
    _fwd_kernel[grid](h, g.contiguous(), out, m, i, h.stride(0), out.stride(0), *scalars,
                      **flags, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


def act_scaled_backward(act, h: torch.Tensor, g: torch.Tensor, da_scaled: torch.Tensor,
                        want_a: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns ``(dh`` like ``h, g * act(h) [M, I] or None, dg [M] fp32)``."""
    scalars, flags = _act_args(act)
    h, da_scaled = _rowmajor(h), _rowmajor(da_scaled)
    m, i = h.shape[0], act.out_width(h.shape[1])
    dh = torch.empty_like(h)
    a = torch.empty(m, i, dtype=h.dtype, device=h.device) if want_a else dh
    dg = torch.empty(m, dtype=torch.float32, device=h.device)
    if m == 0:
        return dh, (a if want_a else None), dg
    grid = (triton.cdiv(m, 16),)
    _bwd_kernel[grid](h, g.contiguous(), da_scaled, dh, a, dg, m, i, h.stride(0),
                      da_scaled.stride(0), dh.stride(0), a.stride(0), *scalars, **flags,
                      STORE_A=want_a, BLOCK_M=16, BLOCK_N=128, num_warps=4)
    return dh, (a if want_a else None), dg
