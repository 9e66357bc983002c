"""Grouped GEMM primitives with one backend choice: torch's grouped_mm, else a per-group loop.

Two shapes are needed:

* ``grouped_mm(a [M, K], b [G, K, N], offs)``: rows of ``a`` split into groups by ``offs``
  (int32 group ends), group ``g`` multiplied by ``b[g]``; the forward and dX GEMMs.
* ``grouped_mm_wgrad(a [M, K], dy [M, N], offs)``: ``out[g] = a_g^T dy_g`` with the groups
  along the reduction dimension; the dW GEMM. Empty groups give zeros.

torch's kernels need 16-byte aligned strides and float32/bfloat16/float16 inputs; anything
else (float64 oracles, odd sizes on CPU, older torch) runs the loop, which computes the same
products in the same dtype.
"""

from __future__ import annotations

import functools
import logging

import torch

from .backend import use_triton
from .checks import check, check_same_device, check_same_dtype
from .dtypes import to_accum

log = logging.getLogger("groupmoe")

_NATIVE = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[tuple] = set()


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned base and strides, and one of the two matrix dims contiguous."""
    item = t.element_size()
    if t.dim() >= 2 and 1 not in (t.stride(-1), t.stride(-2)):
        return False
    return t.data_ptr() % 16 == 0 and all(
        (s * item) % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1
    )


def native_available(*tensors: torch.Tensor) -> bool:
    """Whether torch's grouped_mm can run on these operands."""
    if _NATIVE is None:
        return False
    t0 = tensors[0]
    if t0.dtype not in _NATIVE_DTYPES:
        return False
    if t0.is_cuda:
        if cuda_capability(t0.device.index) < (8, 0):
            return False
        if t0.dtype == torch.float32:  # CUDA grouped_mm is a bf16/fp16 kernel
            return False
    return all(_aligned(t) for t in tensors)


@functools.cache
def cuda_capability(index: int | None) -> tuple[int, int]:
    """The CUDA device's compute capability, cached: the query costs microseconds on every
    grouped GEMM of a step otherwise."""
    return torch.cuda.get_device_capability(index)


def _note_fallback(reason: str, key: tuple) -> None:
    if key not in _warned:
        _warned.add(key)
        log.info("groupmoe: per-group loop for %s (%s)", key, reason)


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def _check_offsets(offs: torch.Tensor, groups: int, where: str) -> None:
    check(offs.dim() == 1 and offs.numel() == groups,
          lambda: f"{where}: offs must be [{groups}] (one end per group), got {tuple(offs.shape)}")
    check(offs.dtype == torch.int32, lambda: f"{where}: offs must be int32, got {offs.dtype}")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of group g] = a[rows of g] @ b[g]``; rows past ``offs[-1]`` are undefined."""
    check(a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1],
          lambda: f"grouped_mm: want a [M, K] and b [G, K, N], got {tuple(a.shape)} and "
          f"{tuple(b.shape)}")
    _check_offsets(offs, b.shape[0], "grouped_mm")
    check_same_dtype("grouped_mm", a=a, b=b)
    check_same_device("grouped_mm", a=a, b=b, offs=offs)
    if native_available(a, b):
        return _NATIVE(a, b, offs=offs)
    _note_fallback("unsupported dtype/alignment", (a.device.type, a.dtype, "mm"))
    out = a.new_zeros(a.shape[0], b.shape[2])
    for g, (s, e) in enumerate(_bounds(offs)):
        if e > s:
            torch.mm(a[s:e], b[g], out=out[s:e])
    return out


def grouped_mm_wgrad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[g] = a[rows of g]^T @ dy[rows of g]``, ``[G, K, N]``; empty groups give zeros."""
    check(a.dim() == 2 and dy.dim() == 2 and a.shape[0] == dy.shape[0],
          lambda: f"grouped_mm_wgrad: want a [M, K] and dy [M, N], got {tuple(a.shape)} and "
          f"{tuple(dy.shape)}")
    check_same_dtype("grouped_mm_wgrad", a=a, dy=dy)
    groups = offs.numel()
    at = a.t()
    if native_available(at, dy):
        return _NATIVE(at, dy, offs=offs)
    _note_fallback("unsupported dtype/alignment", (a.device.type, a.dtype, "wgrad"))
    out = a.new_zeros(groups, a.shape[1], dy.shape[1])
    for g, (s, e) in enumerate(_bounds(offs)):
        if e > s:
            torch.mm(at[:, s:e], dy[s:e], out=out[g])
    return out


def grouped_wgrad_in_layout(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor,
                            transposed: bool) -> torch.Tensor:
    """``out[g] = a_g^T dy_g`` (``[G, K, N]``), made as the transposed view of a contiguous
    ``[G, N, K]`` when ``transposed`` (the weight is such a view: ``nn.Linear``-layout stacks,
    e.g. transformers' stacked experts), so accumulating it into the parameter needs no
    strided copy (measured on an H100: ~3 ms per 800 MB weight otherwise).
    """
    if transposed:
        return grouped_mm_wgrad(dy, a, offs).transpose(-1, -2)
    return grouped_mm_wgrad(a, dy, offs)


def wgrad_like(like: torch.Tensor, groups: int, k: int, n: int, transposed: bool
               ) -> torch.Tensor:
    """An empty ``[G, K, N]`` in the layout :func:`grouped_wgrad_in_layout` returns (what the
    custom ops' fakes give)."""
    if transposed:
        return like.new_empty(groups, n, k).transpose(-1, -2)
    return like.new_empty(groups, k, n)


def segment_sum(x: torch.Tensor, group_index: torch.Tensor, groups: int,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Sum rows of ``x`` per group in fp32: the bias gradient of ``bias[group_index]``.

    With ``offsets`` (the groups' cumulative row ends; rows sorted by group), CUDA tensors take
    one Triton pass that reads ``x`` in place: no fp32 copy, no atomics, deterministic (on an
    H100 the copy + ``index_add_`` took 1.8 ms for gpt-oss-20b's gate_up bias gradient).
    """
    if offsets is not None and x.dim() == 2 and use_triton(x):
        from ..kernels.bias_prob import segment_sum as segment_sum_kernel

        return segment_sum_kernel(x, offsets)
    xa = to_accum(x)
    out = torch.zeros(groups, *x.shape[1:], dtype=xa.dtype, device=x.device)
    return out.index_add_(0, group_index, xa)
