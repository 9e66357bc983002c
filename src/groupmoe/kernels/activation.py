"""Fused gated activation with router-weight scaling, forward and backward, one pass each.

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

SWIGLU, GPTOSS = 0, 1


@triton.jit
def _act(gate, up, KIND: tl.constexpr, alpha, limit):
    if KIND == 0:
        s = tl.sigmoid(gate)
        return gate * s * up
    gc = tl.minimum(gate, limit)
    uc = tl.minimum(tl.maximum(up, -limit), limit)
    return (uc + 1.0) * gc * tl.sigmoid(alpha * gc)


@triton.jit
def act_backward(gate, up, da, KIND: tl.constexpr, alpha, limit):
    """``(act(gate, up), dgate, dup)`` in fp32 from fp32 ``gate``, ``up`` and ``da``, the
    gradient of the (unscaled) activation output. gpt-oss's clamps pass gradient only inside
    their range (torch's convention)."""
    if KIND == 0:
        s = tl.sigmoid(gate)
        silu = gate * s
        return silu * up, da * up * s * (1.0 + gate * (1.0 - s)), da * silu
    gc = tl.minimum(gate, limit)
    uc = tl.minimum(tl.maximum(up, -limit), limit)
    s = tl.sigmoid(alpha * gc)
    glu = gc * s
    dgate = da * (uc + 1.0) * (s + alpha * glu * (1.0 - s))
    dgate = tl.where(gate <= limit, dgate, 0.0)
    dup = tl.where((up >= -limit) & (up <= limit), da * glu, 0.0)
    return (uc + 1.0) * glu, dgate, dup


@triton.jit
def _cols(offs_n, inter, KIND: tl.constexpr):
    if KIND == 0:
        return offs_n, offs_n + inter
    return 2 * offs_n, 2 * offs_n + 1


@triton.jit
def _fwd_kernel(h_ptr, g_ptr, out_ptr, M, inter, stride_h, stride_o, alpha, limit,
                KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < inter)
    cg, cu = _cols(offs_n, inter, KIND)
    row = offs_m[:, None].to(tl.int64)
    gate = tl.load(h_ptr + row * stride_h + cg[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + cu[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    a = _act(gate, up, KIND, alpha, limit) * g[:, None]
    tl.store(out_ptr + row * stride_o + offs_n[None, :], a.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _bwd_kernel(h_ptr, g_ptr, da_ptr, dh_ptr, a_ptr, dg_ptr, M, inter, stride_h, stride_da,
                stride_dh, stride_a, alpha, limit, KIND: tl.constexpr, STORE_A: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = offs_m[:, None].to(tl.int64)
    g = tl.load(g_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, inter, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < inter)
        cg, cu = _cols(offs_n, inter, KIND)
        gate = tl.load(h_ptr + row * stride_h + cg[None, :], mask=mask, other=0.0)
        gate = gate.to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + cu[None, :], mask=mask, other=0.0).to(tl.float32)
        da_s = tl.load(da_ptr + row * stride_da + offs_n[None, :], mask=mask, other=0.0)
        da_s = da_s.to(tl.float32)
        a, dgate, dup = act_backward(gate, up, da_s * g[:, None], KIND, alpha, limit)
        dg += tl.sum(da_s * a, axis=1)
        out_ty = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * stride_dh + cg[None, :], dgate.to(out_ty), mask=mask)
        tl.store(dh_ptr + row * stride_dh + cu[None, :], dup.to(out_ty), mask=mask)
        if STORE_A:
            tl.store(a_ptr + row * stride_a + offs_n[None, :], (a * g[:, None]).to(out_ty),
                     mask=mask)
    tl.store(dg_ptr + offs_m, dg, mask=offs_m < M)


def act_kind(act) -> tuple[int, float, float]:
    if act.name == "swiglu":
        return SWIGLU, 0.0, 0.0
    if act.name == "gptoss":
        return GPTOSS, float(act.alpha), float(act.limit)
    raise ValueError(f"no fused kernel for activation {act.name!r}")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def act_scaled_forward(act, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * act(h)`` in one pass; ``h [M, 2I]``, ``g [M]``."""
    kind, alpha, limit = act_kind(act)
    h = _rowmajor(h)
    m, i = h.shape[0], h.shape[1] // 2
    out = torch.empty(m, i, dtype=h.dtype, device=h.device)
    if m == 0 or i == 0:
        return out
    grid = (triton.cdiv(m, 32), triton.cdiv(i, 128))
    _fwd_kernel[grid](h, g.contiguous(), out, m, i, h.stride(0), out.stride(0), alpha, limit,
                      KIND=kind, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


def act_scaled_backward(act, h: torch.Tensor, g: torch.Tensor, da_scaled: torch.Tensor,
                        want_a: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns ``(dh [M, 2I], g * act(h) [M, inter] or None, dg [M] fp32)``."""
    kind, alpha, limit = act_kind(act)
    h, da_scaled = _rowmajor(h), _rowmajor(da_scaled)
    m, i = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    a = torch.empty(m, i, dtype=h.dtype, device=h.device) if want_a else dh
    dg = torch.empty(m, dtype=torch.float32, device=h.device)
    if m == 0:
        return dh, (a if want_a else None), dg
    grid = (triton.cdiv(m, 16),)
    _bwd_kernel[grid](h, g.contiguous(), da_scaled, dh, a, dg, m, i, h.stride(0),
                      da_scaled.stride(0), dh.stride(0), a.stride(0), alpha, limit,
                      KIND=kind, STORE_A=want_a, BLOCK_M=16, BLOCK_N=128, num_warps=4)
    return dh, (a if want_a else None), dg
