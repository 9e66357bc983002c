"""Grouped GEMM with the row gather in its A loads, fused gated-activation epilogue, and a
deterministic k-slot combine.

Tile scheduling needs no host sync: each program reads the ``E`` group ends, computes every
group's tile count ``ceil(c_e / BLOCK_M)`` and their running sum in registers, and finds its
own ``(expert, first row)``. The grid is the bound ``ceil(N / BLOCK_M) + E`` row tiles (times
the column tiles); programs past the real tile count return at once. Because the schedule is
derived inside the kernel, every autotuned ``BLOCK_M`` gets its own without precomputation.

Import only where Triton is installed; see :mod:`groupmoe.kernels`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.checks import check, check_same_device
from . import interpreting

ACT_NONE, ACT_SWIGLU, ACT_GPTOSS = 0, 1, 2
_ACT_CODES = {"none": ACT_NONE, "swiglu": ACT_SWIGLU, "gptoss": ACT_GPTOSS}

# One fixed config: the interpreter (autotuning there would time CPU emulation) and
# GROUPMOE_TRITON_AUTOTUNE=0.
DEFAULT_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def tile_configs(blocks: tuple[str, ...], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """Autotune configs from rows ``(*block sizes, warps, stages)``, the block sizes named by
    ``blocks`` in row order."""
    return [triton.Config(dict(zip(blocks, row)), num_warps=row[-2], num_stages=row[-1])
            for row in shapes]


def _configs() -> list[triton.Config]:
    """A short H100 bf16 list; ``BLOCK_N`` is the width of the h tile (act outputs are half)."""
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [  # ..., warps, stages
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
    ])


def _autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("GROUPMOE_TRITON_AUTOTUNE", "1") != "0"


@triton.jit
def _tile_of(pid_m, offs_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(expert, first row, group end)`` of row tile ``pid_m``; ``expert >= E`` past the end."""
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(offs_ptr + e, mask=e < E, other=0)
    starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    # cum is non-decreasing, so the count of groups ending at or before pid_m is its group.
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    sel = e == expert
    first_tile = tl.sum(tl.where(sel, cum - tiles, 0), 0)
    start = tl.sum(tl.where(sel, starts, 0), 0)
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return expert, start + (pid_m - first_tile) * BLOCK_M, end


@triton.jit
def _swizzled_tile(pid, M_ROWS, num_pid_n, offs_ptr, E, BLOCK_M: tl.constexpr,
                   BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """``(expert, first row, group end, column tile)`` of program ``pid``: GROUP_M row tiles
    sweep the column tiles together (L2 reuse of the expert's weight tile)."""
    num_pid_m = tl.cdiv(M_ROWS, BLOCK_M) + E
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    expert, row0, row_end = _tile_of(pid_m, offs_ptr, E, BLOCK_M, BLOCK_E)
    return expert, row0, row_end, (pid % in_group) // size_m


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the CPU interpreter (triton 3.9) multiplies bf16 operands wrongly
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.heuristics({
    # column tile: whole BLOCK_N for a plain GEMM, half for the act outputs (two h halves)
    "TILE_N": lambda args: args["BLOCK_N"] // (1 if args["ACT"] == ACT_NONE else 2),
    "ACC_N": lambda args: args["BLOCK_N"] // (2 if args["ACT"] == ACT_SWIGLU else 1),
})
@triton.jit
def _grouped_mm_kernel(
    a_ptr, idx_ptr, w_ptr, offs_ptr, bias_ptr, scale_ptr, out_idx_ptr, h_ptr, out_ptr,
    M_ROWS, K, N_COLS, E,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_hm, stride_om,
    alpha, limit,
    HAS_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_N: tl.constexpr, ACC_N: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """ACT 0: ``out[r] = A[r] W[e] (+ bias[e] * scale[r])``, stored at row ``out_idx[r]``.
    ACT 1/2: ``h = A[r] W[e] + bias[e]`` (stored when STORE_H), ``out = act(h) * scale[r]``;
    swiglu's gate/up are the two column halves, gpt-oss's are interleaved."""
    expert, row0, row_end, pid_n = _swizzled_tile(
        tl.program_id(0), M_ROWS, tl.cdiv(N_COLS, TILE_N), offs_ptr, E, BLOCK_M, BLOCK_E, GROUP_M)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    if HAS_INDEX:
        src = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_base = w_ptr + expert.to(tl.int64) * stride_we

    # column sets: c1 is the whole tile (ACT 0, gpt-oss) or the gate half (swiglu); c2 the up half
    if ACT == 2:
        c1 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c1_mask = c1 < 2 * N_COLS
    else:
        c1 = pid_n * TILE_N + tl.arange(0, TILE_N)
        c1_mask = c1 < N_COLS
    c2 = c1 + N_COLS
    w1_ptrs = w_base + offs_k[:, None] * stride_wk + c1[None, :] * stride_wn
    w2_ptrs = w_base + offs_k[:, None] * stride_wk + c2[None, :] * stride_wn
    acc1 = tl.zeros((BLOCK_M, ACC_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b1 = tl.load(w1_ptrs, mask=c1_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b1 = tl.load(w1_ptrs, mask=k_mask[:, None] & c1_mask[None, :], other=0.0)
        acc1 = _dot(a, b1, acc1, DOT_PRECISION, UPCAST)
        if ACT == 1:
            if EVEN_K:
                b2 = tl.load(w2_ptrs, mask=c1_mask[None, :], other=0.0)
            else:
                b2 = tl.load(w2_ptrs, mask=k_mask[:, None] & c1_mask[None, :], other=0.0)
            acc2 = _dot(a, b2, acc2, DOT_PRECISION, UPCAST)
            w2_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w1_ptrs += BLOCK_K * stride_wk

    out_ty = out_ptr.dtype.element_ty
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        bias1 = tl.load(b_base + c1 * stride_bn, mask=c1_mask, other=0.0).to(tl.float32)
    if ACT == 0:
        if HAS_BIAS:
            if HAS_SCALE:
                acc1 += scale[:, None] * bias1[None, :]
            else:
                acc1 += bias1[None, :]
        if HAS_OUT_INDEX:
            dst = tl.load(out_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            dst = rows
        tl.store(out_ptr + dst[:, None] * stride_om + c1[None, :], acc1.to(out_ty),
                 mask=row_mask[:, None] & c1_mask[None, :])
    else:
        h_mask = row_mask[:, None] & c1_mask[None, :]
        if HAS_BIAS:
            acc1 += bias1[None, :]
        # the activation reads h rounded to its dtype, as backward (which gets the saved h) does
        h1 = acc1.to(out_ty)
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * stride_hm + c1[None, :], h1, mask=h_mask)
        if ACT == 1:
            if HAS_BIAS:
                acc2 += tl.load(b_base + c2 * stride_bn, mask=c1_mask, other=0.0)[None, :].to(
                    tl.float32)
            h2 = acc2.to(out_ty)
            if STORE_H:
                tl.store(h_ptr + rows[:, None] * stride_hm + c2[None, :], h2, mask=h_mask)
            gate = h1.to(tl.float32)
            up = h2.to(tl.float32)
            act = gate * tl.sigmoid(gate) * up
            cols = c1
            col_mask = c1_mask
        else:
            gate, up = tl.split(tl.reshape(h1.to(tl.float32), (BLOCK_M, TILE_N, 2)))
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            act = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
            cols = pid_n * TILE_N + tl.arange(0, TILE_N)
            col_mask = cols < N_COLS
        if HAS_SCALE:
            act = act * scale[:, None]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], act.to(out_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


_grouped_mm_tuned = triton.autotune(configs=_configs(), key=["N_COLS", "K", "ACT"])(
    _grouped_mm_kernel)


def _launch(a, token_index, w, offsets, out, *, h=None, bias=None, scale=None, out_index=None,
            act=ACT_NONE, alpha=1.702, limit=7.0, config=None):
    m_rows = token_index.numel() if token_index is not None else a.shape[0]
    e, k = w.shape[0], w.shape[1]
    n_cols = out.shape[1]
    dummy = offsets  # placeholder pointer for absent optional operands (never read)
    args = (
        a, token_index if token_index is not None else dummy, w, offsets,
        bias if bias is not None else dummy, scale if scale is not None else dummy,
        out_index if out_index is not None else dummy, h if h is not None else out, out,
        m_rows, k, n_cols, e,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        h.stride(0) if h is not None else 0, out.stride(0),
        float(alpha), float(limit),
    )
    flags = dict(
        HAS_INDEX=token_index is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_OUT_INDEX=out_index is not None, ACT=act, STORE_H=h is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
        BLOCK_E=max(16, triton.next_power_of_2(e)),
    )
    tile_div = 1 if act == ACT_NONE else 2

    def grid(meta):
        tiles_m = triton.cdiv(m_rows, meta["BLOCK_M"]) + e
        return (tiles_m * triton.cdiv(n_cols, meta["BLOCK_N"] // tile_div),)

    if config is None and _autotune_enabled():
        # EVEN_K depends on the tuned BLOCK_K; every config uses 64, asserted here
        flags["EVEN_K"] = k % 64 == 0
        _grouped_mm_tuned[grid](*args, **flags)
    else:
        cfg = dict(DEFAULT_CONFIG if config is None else config)
        flags["EVEN_K"] = k % cfg["BLOCK_K"] == 0
        _grouped_mm_kernel[grid](*args, **flags, **cfg)


def _check_common(where, a, token_index, w, offsets, bias):
    check(a.dim() == 2 and w.dim() == 3 and a.shape[1] == w.shape[1],
          f"{where}: want x [T, K] and w [E, K, N], got {tuple(a.shape)} and {tuple(w.shape)}")
    check(offsets.dim() == 1 and offsets.numel() == w.shape[0] and offsets.dtype == torch.int32,
          f"{where}: offsets must be int32 [{w.shape[0]}], got {offsets.dtype} "
          f"{tuple(offsets.shape)}")
    check(a.dtype == w.dtype, f"{where}: x and w must share a dtype, got {a.dtype}, {w.dtype}")
    if token_index is not None:
        check(token_index.dim() == 1 and not token_index.is_floating_point(),
              f"{where}: token_index must be a 1-D integer tensor")
    if bias is not None:
        check(bias.dim() == 2 and bias.shape[0] == w.shape[0],
              f"{where}: bias must be [E, N], got {tuple(bias.shape)}")
    check_same_device(where, x=a, token_index=token_index, w=w, offsets=offsets, bias=bias)


def gather_grouped_mm(
    x: torch.Tensor,
    token_index: torch.Tensor | None,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    bias_scale: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``out[r] = x[token_index[r]] @ w[e(r)] (+ bias[e(r)] * bias_scale[r])``, ``[N, N_out]``.

    Args:
        x: ``[T, K]``; rows are gathered inside the kernel's loads (no permuted copy).
        token_index: ``[N]`` source row of each expert-sorted row; ``None`` reads ``x`` rows
            in order (``N = T``).
        w: ``[E, K, N_out]``, any strides (e.g. a ``.transpose(-1, -2)`` view).
        offsets: int32 ``[E]`` group ends (``grouped_mm``'s ``offs``).
        bias, bias_scale: optional per-expert ``[E, N_out]`` bias, optionally scaled per row.
        out_index: optional ``[N]``: row ``r`` is stored at ``out[out_index[r]]``.
        config: explicit tile config (dict of BLOCK_M/N/K, num_warps, num_stages) instead of
            autotuning.
    Rows past ``offsets[-1]`` are not written (as with ``grouped_mm``).
    """
    _check_common("gather_grouped_mm", x, token_index, w, offsets, bias)
    check(bias_scale is None or bias is not None,
          "gather_grouped_mm: bias_scale scales the bias; pass a bias with it")
    n = token_index.numel() if token_index is not None else x.shape[0]
    out = torch.empty(n, w.shape[2], dtype=x.dtype, device=x.device)
    if n:
        _launch(x, token_index, w, offsets, out, bias=bias, scale=bias_scale,
                out_index=out_index, config=config)
    return out


def gather_grouped_mm_act(
    x: torch.Tensor,
    token_index: torch.Tensor | None,
    w: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
    *,
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    store_h: bool = True,
    alpha: float = 1.702,
    limit: float = 7.0,
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The gate_up GEMM with its activation and router-weight scale in the epilogue.

    ``h = x[token_index] @ w[e] + bias[e]`` (``[N, 2I]``) and ``a' = act(h) * row_scale``
    (``[N, I]``). ``activation`` is ``"swiglu"`` (gate = first half of the columns) or
    ``"gptoss"`` (interleaved, gate clamped to ``limit`` from above, up to ``[-limit, limit]``,
    ``(up + 1) * gate * sigmoid(alpha * gate)``). Returns ``(h or None, a')``.
    """
    _check_common("gather_grouped_mm_act", x, token_index, w, offsets, bias)
    check(activation in ("swiglu", "gptoss"),
          f"gather_grouped_mm_act: activation must be 'swiglu' or 'gptoss', got {activation!r}")
    check(w.shape[2] % 2 == 0, f"gather_grouped_mm_act: w's output size {w.shape[2]} is odd")
    n = token_index.numel() if token_index is not None else x.shape[0]
    inter = w.shape[2] // 2
    h = torch.empty(n, 2 * inter, dtype=x.dtype, device=x.device) if store_h else None
    out = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    if n:
        _launch(x, token_index, w, offsets, out, h=h, bias=bias, scale=row_scale,
                act=_ACT_CODES[activation], alpha=alpha, limit=limit, config=config)
    return h, out


@triton.jit
def _combine_kernel(y_ptr, idx_ptr, out_ptr, T, H, stride_y, stride_o,
                    TOP_K: tl.constexpr, HAS_INDEX: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = toks < T
    mask = t_mask[:, None] & (cols[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        flat = toks.to(tl.int64) * TOP_K + s
        if HAS_INDEX:
            flat = tl.load(idx_ptr + flat, mask=t_mask, other=0).to(tl.int64)
        acc += tl.load(y_ptr + flat[:, None] * stride_y + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_o + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_rows(
    y: torch.Tensor, top_k: int, index: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[t] = sum_s y[index[t*k + s]]`` (``y[t*k + s]`` without ``index``), ``[T, H]``.

    Accumulated in fp32 registers and cast once; deterministic (no atomics), no fp32 buffer.
    ``index`` is :attr:`Routing.inverse` for expert-sorted ``y``.
    """
    check(y.dim() == 2 and y.stride(1) == 1, "combine_rows: y must be [rows, H], unit col stride")
    check(top_k >= 1, f"combine_rows: top_k must be >= 1, got {top_k}")
    rows = index.numel() if index is not None else y.shape[0]
    check(rows % top_k == 0, f"combine_rows: {rows} rows are not a multiple of top_k={top_k}")
    t, hdim = rows // top_k, y.shape[1]
    out = torch.empty(t, hdim, dtype=dtype or y.dtype, device=y.device)
    if t and hdim:
        block_h = min(256, max(16, triton.next_power_of_2(hdim)))
        grid = (triton.cdiv(t, 8), triton.cdiv(hdim, block_h))
        _combine_kernel[grid](y, index if index is not None else y, out, t, hdim, y.stride(0),
                              out.stride(0), TOP_K=top_k, HAS_INDEX=index is not None,
                              BLOCK_T=8, BLOCK_H=block_h, num_warps=4)
    return out
