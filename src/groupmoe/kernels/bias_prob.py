"""Gradients of the gate-scaled down bias ``prob[i] * bias[expert(i)]`` (seed 002), fp32 out:

* ``dbias[e] = sum_{i in e} prob_i dy_i``: one program per (expert, column block) walking the
  expert's rows (rows are expert-sorted), so no atomics and a deterministic order; without
  ``prob`` the same kernel is :func:`segment_sum` (the gate_up bias gradient);
* ``dprob[i] = <dy_i, bias[expert(i)]>``: one program per row block walking the columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.checks import check, check_same_device


@triton.jit
def _src_rows(idx_ptr, rows, mask, HAS_INDEX: tl.constexpr):
    """Row of ``dy`` that sorted row ``rows`` reads: ``idx[rows]`` or ``rows`` itself."""
    if HAS_INDEX:
        return tl.load(idx_ptr + rows, mask=mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _dbias_kernel(dy_ptr, idx_ptr, prob_ptr, offs_ptr, out_ptr, H, stride_dy,
                  HAS_INDEX: tl.constexpr, HAS_PROB: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mrow = rows < end
        src = _src_rows(idx_ptr, rows, mrow, HAS_INDEX)
        dy = tl.load(dy_ptr + src[:, None] * stride_dy + cols[None, :],
                     mask=mrow[:, None] & (cols[None, :] < H), other=0.0).to(tl.float32)
        if HAS_PROB:
            dy = dy * tl.load(prob_ptr + rows, mask=mrow, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(dy, axis=0)
    tl.store(out_ptr + e.to(tl.int64) * H + cols, acc, mask=cols < H)


@triton.jit
def _dprob_kernel(dy_ptr, idx_ptr, bias_ptr, eidx_ptr, out_ptr, M, H, stride_dy, stride_b,
                  HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = rows < M
    src = _src_rows(idx_ptr, rows, mrow, HAS_INDEX)
    e = tl.load(eidx_ptr + rows, mask=mrow, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        m = mrow[:, None] & (cols[None, :] < H)
        dy = tl.load(dy_ptr + src[:, None] * stride_dy + cols[None, :], mask=m,
                     other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + e[:, None] * stride_b + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)
        acc += tl.sum(dy * b, axis=1)
    tl.store(out_ptr + rows, acc, mask=mrow)


def bias_prob_grads(dy: torch.Tensor, prob: torch.Tensor, bias: torch.Tensor,
                    offsets: torch.Tensor, expert_index: torch.Tensor,
                    dy_index: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dbias [E, H] fp32, dprob [M] fp32)`` from expert-sorted ``dy [M, H]``, or from
    ``dy [T, H]`` read through ``dy_index [M]`` (row ``i`` is ``dy[dy_index[i]]``, no gathered
    copy).

    ``offsets [E]`` are the groups' cumulative row ends (int32 or int64) and
    ``expert_index [M]`` each row's expert; any strides, fresh fp32 outputs (nothing is
    accumulated into caller memory, so no output dtype can be wrong).
    """
    where = "bias_prob_grads"
    check(dy.dim() == 2, f"{where}: dy must be [rows, hidden], got {tuple(dy.shape)}")
    h = dy.shape[1]
    m = dy.shape[0] if dy_index is None else dy_index.numel()
    if dy_index is not None:
        check(dy_index.dim() == 1 and not dy_index.is_floating_point(),
              f"{where}: dy_index must be a 1-D integer tensor")
    check(bias.dim() == 2 and bias.shape[1] == h,
          f"{where}: bias must be [experts, {h}], got {tuple(bias.shape)}")
    e = bias.shape[0]
    check(prob.shape == (m,), f"{where}: prob must be [{m}], got {tuple(prob.shape)}")
    check(offsets.shape == (e,), f"{where}: offsets must be [{e}], got {tuple(offsets.shape)}")
    check(expert_index.shape == (m,),
          f"{where}: expert_index must be [{m}], got {tuple(expert_index.shape)}")
    for name, t in (("offsets", offsets), ("expert_index", expert_index)):
        check(t.dtype in (torch.int32, torch.int64),
              f"{where}: {name} must be int32 or int64, got {t.dtype}")
    check(all(t.is_floating_point() for t in (dy, prob, bias)),
          f"{where}: dy, prob and bias must be floating point")
    check_same_device(where, dy=dy, prob=prob, bias=bias, offsets=offsets,
                      expert_index=expert_index, dy_index=dy_index)
    # Row strides are kernel arguments; the other dims must be unit-stride.
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    prob, offsets, expert_index = (t.contiguous() for t in (prob, offsets, expert_index))
    dbias = torch.empty(e, h, dtype=torch.float32, device=dy.device)
    dprob = torch.empty(m, dtype=torch.float32, device=dy.device)
    if h == 0:
        return dbias.zero_(), dprob.zero_()
    block_h = min(128, triton.next_power_of_2(h))
    has_index = dy_index is not None
    idx = dy_index.contiguous() if has_index else expert_index  # placeholder when absent
    if e:
        _dbias_kernel[(e, triton.cdiv(h, block_h))](dy, idx, prob, offsets, dbias, h,
                                                    dy.stride(0), HAS_INDEX=has_index,
                                                    HAS_PROB=True, BLOCK_M=32, BLOCK_H=block_h)
    if m:
        _dprob_kernel[(triton.cdiv(m, 32),)](dy, idx, bias, expert_index, dprob, m, h,
                                             dy.stride(0), bias.stride(0), HAS_INDEX=has_index,
                                             BLOCK_M=32, BLOCK_H=block_h)
    return dbias, dprob


def segment_sum(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = sum of rows of x in group e`` (fp32 ``[E, H]``) for rows sorted by group,
    ``offsets [E]`` their cumulative ends: read in place (no fp32 copy of ``x``), no atomics,
    a fixed summation order."""
    check(x.dim() == 2, f"segment_sum: x must be [rows, hidden], got {tuple(x.shape)}")
    check(offsets.dim() == 1 and offsets.dtype in (torch.int32, torch.int64),
          f"segment_sum: offsets must be a 1-D int32/int64 tensor, got {offsets.dtype} "
          f"{tuple(offsets.shape)}")
    check_same_device("segment_sum", x=x, offsets=offsets)
    x = x if x.stride(-1) == 1 else x.contiguous()
    offsets = offsets.contiguous()
    e, h = offsets.numel(), x.shape[1]
    out = torch.empty(e, h, dtype=torch.float32, device=x.device)
    if e and h:
        block_h = min(128, triton.next_power_of_2(h))
        _dbias_kernel[(e, triton.cdiv(h, block_h))](x, offsets, x, offsets, out, h, x.stride(0),
                                                    HAS_INDEX=False, HAS_PROB=False,
                                                    BLOCK_M=32, BLOCK_H=block_h)
    return out
