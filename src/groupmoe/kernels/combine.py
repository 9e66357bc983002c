"""Gather-sum combine: ``out[t] = sum_s rows[inverse[t*k + s]]`` in fp32 registers, cast once.

Reads each routed row once and writes each token once: no ``[T*k, H]`` gathered copy and no
atomics (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_sum_kernel(rows_ptr, inv_ptr, out_ptr, T, H, stride_r, stride_o,
                       TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_h[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for s in range(TOP_K):
        src = tl.load(inv_ptr + offs_t * TOP_K + s, mask=mask_t, other=0).to(tl.int64)
        acc += tl.load(rows_ptr + src[:, None] * stride_r + offs_h[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * stride_o + offs_h[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(rows: torch.Tensor, inverse: torch.Tensor, top_k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``rows [T*k, H]`` (expert-sorted) -> ``[T, H]`` in ``dtype``."""
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    t, h = inverse.numel() // top_k, rows.shape[1]
    out = torch.empty(t, h, dtype=dtype, device=rows.device)
    if t == 0 or h == 0:
        return out
    block_h = min(256, triton.next_power_of_2(h))
    grid = (triton.cdiv(t, 16), triton.cdiv(h, block_h))
    _gather_sum_kernel[grid](rows, inverse, out, t, h, rows.stride(0), out.stride(0),
                             TOP_K=top_k, BLOCK_T=16, BLOCK_H=block_h, num_warps=4)
    return out
