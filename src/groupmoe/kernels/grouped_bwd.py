"""Backward kernels of the expert MLP: the down projection's dX GEMM with the activation
backward in its epilogue, and a grouped weight-gradient GEMM reading rows in place.

* :func:`down_dx_act`: ``da' = dy[token_index] @ W_down[e]^T`` with the output-gradient rows
  gathered in the A loads (no permuted copy of ``dy``); the epilogue takes ``h`` and the router
  weight ``g`` and writes ``dh = act'(h) * (g * da')``, optionally ``a' = g * act(h)`` (for
  dW_down), and per-tile partial sums of ``dg = <da', act(h)>`` that are reduced afterwards in
  a fixed order (deterministic, no float atomics).
* :func:`grouped_wgrad`: ``dW[e] = A[rows of e]^T @ dY[rows of e]`` where either operand's rows
  may be read through an index (``x`` for dW_gate_up, ``dy`` for dW_down), accumulated in fp32
  and stored in the weight's own layout (``[E, in, out]`` or a transposed ``[E, out, in]``
  view) and dtype. Empty groups give zeros.

Row tiles are scheduled as in :mod:`groupmoe.kernels.grouped` (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.checks import check
from . import interpreting
from .activation import act_backward, act_kind
from .grouped import _autotune_enabled, _dot, _swizzled_tile, tile_configs

# the fixed configs (interpreter, GROUPMOE_TRITON_AUTOTUNE=0)
DX_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
WGRAD_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
_MIN_DX_N = 64  # smallest BLOCK_N of the dx configs: sizes the dg partial-sum buffer


def _dx_configs() -> list[triton.Config]:
    # The activation-backward epilogue holds several fp32 tiles: 128x128 tiles spill
    # kilobytes of registers on sm_90 (ptxas), these at most a few dozen bytes. BLOCK_N counts
    # act columns.
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [  # ..., warps, stages
        (64, 64, 64, 8, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (128, 64, 32, 8, 4),
    ])


def _wgrad_configs() -> list[triton.Config]:
    # BLOCK_K: rows of dW, BLOCK_N: its columns, BLOCK_M: the reduction over routed rows
    return tile_configs(("BLOCK_K", "BLOCK_N", "BLOCK_M"), [  # ..., warps, stages
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
    ])


@triton.jit
def _down_dx_act_kernel(
    dy_ptr, idx_ptr, w_ptr, offs_ptr, h_ptr, g_ptr, dh_ptr, a_ptr, dg_ptr,
    M_ROWS, K, INTER, E,
    stride_dym, stride_dyk, stride_we, stride_wk, stride_wn, stride_hm, stride_dhm, stride_am,
    alpha, limit,
    KIND: tl.constexpr, STORE_A: tl.constexpr, WANT_DG: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    """Row tile x activation-column tile: ``da' = dy[idx[r]] Wt[e]``, then the act backward."""
    expert, row0, row_end, pid_n = _swizzled_tile(
        tl.program_id(0), M_ROWS, tl.cdiv(INTER, BLOCK_N), offs_ptr, E, BLOCK_M, BLOCK_E, GROUP_M)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    src = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    dy_ptrs = dy_ptr + src[:, None] * stride_dym + offs_k[None, :] * stride_dyk
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
              + cols[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(dy_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - kk * BLOCK_K
            a = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION, UPCAST)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wk

    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    # 64-bit tile bases and 32-bit in-tile offsets: per-element 64-bit pointer tiles for h, dh
    # and a pushed this epilogue past 255 registers (ptxas spills on sm_90)
    local = tl.arange(0, BLOCK_M)[:, None]
    h_rows = h_ptr + row0.to(tl.int64) * stride_hm
    dh_rows = dh_ptr + row0.to(tl.int64) * stride_dhm
    out_ty = dh_ptr.dtype.element_ty
    if KIND == 0:  # swiglu: gate and up are the two halves of h
        h_offs = local * stride_hm + cols[None, :]
        dh_offs = local * stride_dhm + cols[None, :]
        gate = tl.load(h_rows + h_offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_rows + INTER + h_offs, mask=mask, other=0.0).to(tl.float32)
        act, dgate, dup = act_backward(gate, up, acc * g[:, None], KIND, alpha, limit)
        tl.store(dh_rows + dh_offs, dgate.to(out_ty), mask=mask)
        tl.store(dh_rows + INTER + dh_offs, dup.to(out_ty), mask=mask)
    else:  # gpt-oss: interleaved; one contiguous [rows, 2 * BLOCK_N] tile of h and of dh
        hc = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        h_mask = row_mask[:, None] & (hc[None, :] < 2 * INTER)
        hv = tl.load(h_rows + local * stride_hm + hc[None, :], mask=h_mask,
                     other=0.0).to(tl.float32)
        gate, up = tl.split(tl.reshape(hv, (BLOCK_M, BLOCK_N, 2)))
        act, dgate, dup = act_backward(gate, up, acc * g[:, None], KIND, alpha, limit)
        dhv = tl.reshape(tl.join(dgate, dup), (BLOCK_M, 2 * BLOCK_N))
        tl.store(dh_rows + local * stride_dhm + hc[None, :], dhv.to(out_ty), mask=h_mask)
    if STORE_A:
        tl.store(a_ptr + row0.to(tl.int64) * stride_am + local * stride_am + cols[None, :],
                 (act * g[:, None]).to(out_ty), mask=mask)
    if WANT_DG:
        part = tl.sum(tl.where(mask, acc * act, 0.0), axis=1)
        tl.store(dg_ptr + pid_n.to(tl.int64) * M_ROWS + rows, part, mask=row_mask)


# keyed on the shape, the activation and the weight's layout (stride_wk is 1 for [E, I, H])
_down_dx_act_tuned = triton.autotune(configs=_dx_configs(),
                                     key=["K", "INTER", "KIND", "stride_wk"],
                                     reset_to_zero=["dg_ptr"])(_down_dx_act_kernel)


def down_dx_act(
    dy: torch.Tensor, token_index: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor,
    h: torch.Tensor, g: torch.Tensor, act, *, want_a_scaled: bool, want_dg: bool,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``y = (g * act(h)) @ W_down[e]`` from the ``[T, H]`` output gradient.

    Args:
        dy: ``[T, H]`` gradient of the combined output; row ``r`` of the expert-sorted problem
            reads ``dy[token_index[r]]``.
        w_down: ``[E, I, H]``, any strides.
        h: ``[N, 2I]`` gate_up output (expert-sorted); g: ``[N]`` router weights, same order.
        act: a swiglu or gpt-oss :class:`~groupmoe.ops.activations.Activation`.
    Returns:
        ``dh [N, 2I]`` in ``h``'s dtype, ``g * act(h) [N, I]`` (if ``want_a_scaled``) and
        ``dg = <da', act(h)> [N]`` in fp32 (if ``want_dg``). Rows past ``offsets[-1]`` of
        ``dh`` are not written.
    """
    kind, alpha, limit = act_kind(act)
    check(dy.dim() == 2 and w_down.dim() == 3 and dy.shape[1] == w_down.shape[2],
          f"down_dx_act: want dy [T, H] and w_down [E, I, H], got {tuple(dy.shape)} and "
          f"{tuple(w_down.shape)}")
    e, inter, k = w_down.shape
    n = token_index.numel()
    check(h.shape == (n, 2 * inter) and h.stride(1) == 1 and g.shape == (n,),
          f"down_dx_act: want h [{n}, {2 * inter}] (unit column stride) and g [{n}], got "
          f"{tuple(h.shape)} and {tuple(g.shape)}")
    tuned = config is None and _autotune_enabled()
    cfg = None if tuned else dict(DX_CONFIG if config is None else config)
    # one fp32 partial of dg per (column tile, row); tuned configs have BLOCK_N >= _MIN_DX_N
    min_n = _MIN_DX_N if tuned else cfg["BLOCK_N"]
    dh = torch.empty_like(h)
    a_scaled = torch.empty(n, inter, dtype=h.dtype, device=h.device) if want_a_scaled else None
    parts = torch.zeros(triton.cdiv(inter, min_n) if want_dg else 1, n, dtype=torch.float32,
                        device=h.device)
    if n and inter:
        args = (dy, token_index, w_down, offsets, h, g.contiguous(), dh,
                a_scaled if a_scaled is not None else dh, parts,
                n, k, inter, e,
                dy.stride(0), dy.stride(1), w_down.stride(0), w_down.stride(2),
                w_down.stride(1), h.stride(0), dh.stride(0),
                a_scaled.stride(0) if a_scaled is not None else 0,
                alpha, limit)
        flags = dict(KIND=kind, STORE_A=want_a_scaled, WANT_DG=want_dg,
                     DOT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32",
                     UPCAST=interpreting(), BLOCK_E=max(16, triton.next_power_of_2(e)))

        def grid(meta):
            return ((triton.cdiv(n, meta["BLOCK_M"]) + e) * triton.cdiv(inter, meta["BLOCK_N"]),)

        if tuned:
            flags["EVEN_K"] = k % 64 == 0  # every tuned BLOCK_K divides 64
            _down_dx_act_tuned[grid](*args, **flags)
        else:
            flags["EVEN_K"] = k % cfg["BLOCK_K"] == 0
            _down_dx_act_kernel[grid](*args, **flags, **cfg)
    # fixed summation order over the column tiles: deterministic
    return dh, a_scaled, (parts.sum(0) if want_dg else None)


@triton.jit
def _wgrad_kernel(
    a_ptr, a_idx_ptr, dy_ptr, dy_idx_ptr, offs_ptr, out_ptr,
    K, N, E,
    stride_am, stride_ak, stride_dym, stride_dyn, stride_oe, stride_ok, stride_on,
    A_INDEX: tl.constexpr, DY_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (expert, K tile, N tile) of ``dW[e] = A[rows of e]^T dY[rows of e]``."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    e = pid // (num_k * num_n)
    pid_k = (pid // num_n) % num_k
    pid_n = pid % num_n
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    end = tl.load(offs_ptr + e).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_mask = rows < end
        if A_INDEX:
            a_rows = tl.load(a_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            a_rows = rows
        if DY_INDEX:
            dy_rows = tl.load(dy_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            dy_rows = rows
        at = tl.load(a_ptr + a_rows[None, :] * stride_am + offs_k[:, None] * stride_ak,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        dy = tl.load(dy_ptr + dy_rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(at, dy, acc, DOT_PRECISION, UPCAST)
    out = (out_ptr + e.to(tl.int64) * stride_oe + offs_k[:, None] * stride_ok
           + offs_n[None, :] * stride_on)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


# keyed on the shape, which operand is gathered and the output layout (stride_on is 1 for
# [E, K, N], K for a transposed view)
_wgrad_tuned = triton.autotune(configs=_wgrad_configs(),
                               key=["K", "N", "E", "A_INDEX", "DY_INDEX", "stride_on"])(
    _wgrad_kernel)


def grouped_wgrad(
    a: torch.Tensor, a_index: torch.Tensor | None, dy: torch.Tensor,
    dy_index: torch.Tensor | None, offsets: torch.Tensor, *, transposed: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """``dW[e] = A_e^T dY_e``, ``[E, K, N]`` in ``a``'s dtype (``E = offsets.numel()``).

    Row ``r`` of the expert-sorted problem reads ``a[a_index[r]]`` (``a[r]`` without an index)
    and ``dy[dy_index[r]]``; ``offsets`` are the int32 group ends. With ``transposed`` (the
    weight is the ``[E, K, N]`` view of a contiguous ``[E, N, K]`` parameter) the result is
    such a view too, so autograd accumulates it without a strided copy.
    """
    check(a.dim() == 2 and dy.dim() == 2,
          f"grouped_wgrad: want a [M, K] and dy [M, N], got {tuple(a.shape)} and "
          f"{tuple(dy.shape)}")
    check(a.dtype == dy.dtype, f"grouped_wgrad: a and dy dtypes differ: {a.dtype}, {dy.dtype}")
    e, k, n = offsets.numel(), a.shape[1], dy.shape[1]
    if transposed:
        out = torch.empty(e, n, k, dtype=a.dtype, device=a.device).transpose(-1, -2)
    else:
        out = torch.empty(e, k, n, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    args = (a, a_index if a_index is not None else offsets, dy,
            dy_index if dy_index is not None else offsets, offsets, out, k, n, e,
            a.stride(0), a.stride(1), dy.stride(0), dy.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    flags = dict(A_INDEX=a_index is not None, DY_INDEX=dy_index is not None,
                 DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                 UPCAST=interpreting())

    def grid(meta):
        return (e * triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is None and _autotune_enabled():
        _wgrad_tuned[grid](*args, **flags)
    else:
        _wgrad_kernel[grid](*args, **flags, **(WGRAD_CONFIG if config is None else config))
    return out
