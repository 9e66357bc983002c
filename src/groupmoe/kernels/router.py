"""Top-k router in one launch forward and one backward: logits -> (softmax ->) top-k (->
renormalise or softmax over the k), and the logits' gradient from the weights' gradient.

A program holds a block of tokens' logits in registers (fp32 math, one cast on store). Ties in
the top-k go to the lowest expert index. The backward recomputes the softmax from the logits
(which the caller keeps anyway, for the auxiliary loss) instead of saving probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# experts held in registers per token row; wider routers take torch
MAX_EXPERTS = 1024


@triton.jit
def _load_scores(logits_ptr, rows, cols, T, E, stride, SOFTMAX_FIRST: tl.constexpr):
    """The scores the top-k picks from, fp32: the block's probabilities, or its logits;
    padding lanes score -inf (logits) or 0 (probabilities)."""
    valid = (rows[:, None] < T) & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=valid,
                other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        x = _softmax(x, valid)
    return x


@triton.jit
def _softmax(x, valid):
    """Softmax along axis 1 over the ``valid`` lanes (0 elsewhere)."""
    e = tl.where(valid, tl.exp(x - tl.max(tl.where(valid, x, float("-inf")), 1)[:, None]), 0.0)
    return e / tl.sum(e, 1)[:, None]


@triton.jit
def _route_fwd_kernel(logits_ptr, w_ptr, ids_ptr, T, E, stride,
                      TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, NORMALIZE: tl.constexpr,
                      BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    kc = tl.arange(0, KP)
    score = _load_scores(logits_ptr, rows, cols, T, E, stride, SOFTMAX_FIRST)
    free = (cols < E)[None, :] & (rows < T)[:, None]  # real experts not picked yet
    vals = tl.zeros((BT, KP), dtype=tl.float32)
    ids = tl.zeros((BT, KP), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(free, score, float("-inf")), 1)
        pick = tl.min(tl.where(free & (score == best[:, None]), cols[None, :], EP), 1)
        pick = tl.minimum(pick, E - 1)  # rows past T: any in-range id (never stored)
        vals = tl.where(kc[None, :] == j, best[:, None], vals)
        ids = tl.where(kc[None, :] == j, pick[:, None], ids)
        free = free & (cols[None, :] != pick[:, None])
    k_ok = kc[None, :] < TOP_K
    if SOFTMAX_FIRST:
        w = vals
        if NORMALIZE:
            w = w / tl.sum(tl.where(k_ok, w, 0.0), 1)[:, None]
    else:  # softmax over the k picked logits
        w = _softmax(vals, k_ok)
    out = rows[:, None].to(tl.int64) * TOP_K + kc[None, :]
    m = (rows[:, None] < T) & k_ok
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=m)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=m)


@triton.jit
def _route_bwd_kernel(dw_ptr, logits_ptr, ids_ptr, dx_ptr, T, E, stride,
                      TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, NORMALIZE: tl.constexpr,
                      BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    kc = tl.arange(0, KP)
    score = _load_scores(logits_ptr, rows, cols, T, E, stride, SOFTMAX_FIRST)
    k_ok = (kc[None, :] < TOP_K) & (rows[:, None] < T)
    at = rows[:, None].to(tl.int64) * TOP_K + kc[None, :]
    dw = tl.load(dw_ptr + at, mask=k_ok, other=0.0).to(tl.float32)
    ids = tl.load(ids_ptr + at, mask=k_ok, other=-1).to(tl.int32)
    # the picked scores s_j (probabilities or logits), gathered through a one-hot per slot
    s = tl.zeros((BT, KP), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        id_j = tl.sum(tl.where(kc[None, :] == j, ids, 0), 1)
        s_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], score, 0.0), 1)
        s = tl.where(kc[None, :] == j, s_j[:, None], s)
    s = tl.where(k_ok, s, 0.0)
    if SOFTMAX_FIRST:
        ds = dw
        if NORMALIZE:  # w = s / S: ds_j = (dw_j - sum_i dw_i w_i) / S
            total = tl.sum(s, 1)[:, None]
            ds = (dw - tl.sum(dw * s, 1)[:, None] / total) / total
        c = tl.sum(ds * s, 1)  # softmax backward: dx = p * (dp - sum(p dp)), dp sparse
    else:  # w = softmax(s): ds = w * (dw - sum(dw w))
        w = _softmax(s, k_ok)
        ds = w * (dw - tl.sum(dw * w, 1)[:, None])
    dp = tl.zeros((BT, EP), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        id_j = tl.sum(tl.where(kc[None, :] == j, ids, 0), 1)
        ds_j = tl.sum(tl.where(kc[None, :] == j, ds, 0.0), 1)
        dp = tl.where(cols[None, :] == id_j[:, None], ds_j[:, None], dp)
    dx = score * (dp - c[:, None]) if SOFTMAX_FIRST else dp
    valid = (rows[:, None] < T) & (cols[None, :] < E)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _meta(num_experts: int, top_k: int) -> dict:
    ep = triton.next_power_of_2(num_experts)
    return {"BT": max(1, min(64, 4096 // ep)), "EP": ep, "KP": triton.next_power_of_2(top_k)}


def route_forward(logits: torch.Tensor, top_k: int, softmax_first: bool, normalize: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] in logits.dtype, ids [T, k] int64)``; ``num_experts <= MAX_EXPERTS``."""
    t, e = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    w = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.long, device=logits.device)
    if t:
        meta = _meta(e, top_k)
        _route_fwd_kernel[(triton.cdiv(t, meta["BT"]),)](
            logits, w, ids, t, e, logits.stride(0), TOP_K=top_k, SOFTMAX_FIRST=softmax_first,
            NORMALIZE=normalize, **meta)
    return w, ids


def route_backward(dweights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                   softmax_first: bool, normalize: bool) -> torch.Tensor:
    """The gradient of the logits ``[T, E]`` (logits.dtype) from the weights' ``[T, k]``."""
    t, e = logits.shape
    top_k = ids.shape[1]
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    dx = torch.empty(t, e, dtype=logits.dtype, device=logits.device)
    if t:
        meta = _meta(e, top_k)
        _route_bwd_kernel[(triton.cdiv(t, meta["BT"]),)](
            dweights.contiguous(), logits, ids.contiguous(), dx, t, e, logits.stride(0),
            TOP_K=top_k, SOFTMAX_FIRST=softmax_first, NORMALIZE=normalize, **meta)
    return dx
