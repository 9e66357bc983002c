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
def _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, KIND: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 ``(gate, up)`` tiles of act-output columns ``col0 + [0, BLOCK_N)``. swiglu: the two
    halves of ``h``; gpt-oss: interleaved, read as one contiguous ``[BLOCK_M, 2 * BLOCK_N]``
    tile and split in registers (two stride-2 loads ran at a fifth of the bandwidth)."""
    base = h_ptr + row * stride_h
    if KIND == 0:
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n[None, :] < inter)
        gate = tl.load(base + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(base + inter + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        return gate, up
    hc = 2 * col0 + tl.arange(0, 2 * BLOCK_N)
    mask = row_mask[:, None] & (hc[None, :] < 2 * inter)
    hv = tl.load(base + hc[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(hv, (BLOCK_M, BLOCK_N, 2)))


@triton.jit
def _store_gate_up(ptr, row, stride, col0, row_mask, inter, dgate, dup, KIND: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``(dgate, dup)`` where :func:`_load_gate_up` read ``(gate, up)``."""
    base = ptr + row * stride
    out_ty = ptr.dtype.element_ty
    if KIND == 0:
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n[None, :] < inter)
        tl.store(base + offs_n[None, :], dgate.to(out_ty), mask=mask)
        tl.store(base + inter + offs_n[None, :], dup.to(out_ty), mask=mask)
    else:
        hc = 2 * col0 + tl.arange(0, 2 * BLOCK_N)
        mask = row_mask[:, None] & (hc[None, :] < 2 * inter)
        tl.store(base + hc[None, :],
                 tl.reshape(tl.join(dgate, dup), (BLOCK_M, 2 * BLOCK_N)).to(out_ty), mask=mask)


@triton.jit
def _fwd_kernel(h_ptr, g_ptr, out_ptr, M, inter, stride_h, stride_o, alpha, limit,
                KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    row = offs_m[:, None].to(tl.int64)
    gate, up = _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, KIND, BLOCK_M,
                             BLOCK_N)
    g = tl.load(g_ptr + offs_m, mask=row_mask, other=0.0).to(tl.float32)
    a = _act(gate, up, KIND, alpha, limit) * g[:, None]
    tl.store(out_ptr + row * stride_o + offs_n[None, :], a.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_n[None, :] < inter))


@triton.jit
def _bwd_kernel(h_ptr, g_ptr, da_ptr, dh_ptr, a_ptr, dg_ptr, M, inter, stride_h, stride_da,
                stride_dh, stride_a, alpha, limit, KIND: tl.constexpr, STORE_A: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    row = offs_m[:, None].to(tl.int64)
    g = tl.load(g_ptr + offs_m, mask=row_mask, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col0 in range(0, inter, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (offs_n[None, :] < inter)
        gate, up = _load_gate_up(h_ptr, row, stride_h, col0, row_mask, inter, KIND, BLOCK_M,
                                 BLOCK_N)
        da_s = tl.load(da_ptr + row * stride_da + offs_n[None, :], mask=mask, other=0.0)
        da_s = da_s.to(tl.float32)
        a, dgate, dup = act_backward(gate, up, da_s * g[:, None], KIND, alpha, limit)
        dg += tl.sum(da_s * a, axis=1)
        _store_gate_up(dh_ptr, row, stride_dh, col0, row_mask, inter, dgate, dup, KIND,
                       BLOCK_M, BLOCK_N)
        if STORE_A:
            tl.store(a_ptr + row * stride_a + offs_n[None, :],
                     (a * g[:, None]).to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs_m, dg, mask=row_mask)


def act_kind(act) -> tuple[int, float, float]:
    if act.name == "swiglu":
        return SWIGLU, 0.0, 0.0
    if act.name == "gptoss":
        return GPTOSS, float(act.alpha), float(act.gate_limit)
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
