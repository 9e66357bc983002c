"""Triton kernel: NF4 bytes + block scales -> a dense stack, one launch for all experts.

The scales may be nested (bitsandbytes' double quant): the kernel dequantizes them itself, so a
call is one launch and no fp32 scale tensor is ever made. Imported lazily; ``available()`` says
whether it can run on CUDA here. Under ``TRITON_INTERPRET=1`` it also runs on CPU tensors (used
by the tests).
"""

from __future__ import annotations

import functools
import os

import torch

from .nf4 import _nf4_code

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None


def available() -> bool:
    """Triton is installed and can run (CUDA, or the CPU interpreter)."""
    return triton is not None and (torch.cuda.is_available()
                                   or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                            offset_ptr, out_ptr, n, n_bytes, block0,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                            NESTED: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        # both elements of a byte share a block: blocksize is even
        block = block0 + (offs * 2) // BLOCKSIZE
        if NESTED:  # code2[q] * absmax2 + offset, product then add (launched without FMA)
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                    mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        vals = tl.interleave(hi * scale, lo * scale)  # fp32 products, one rounding on store
        eoffs = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + eoffs, vals.to(out_ptr.dtype.element_ty), mask=eoffs < n)


@functools.cache
def _code(device: torch.device) -> torch.Tensor:
    return _nf4_code(device)


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                          blocksize: int, dtype: torch.dtype, *, block0: int = 0,
                          nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
                          | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``packed`` (uint8, high nibble first, starting at a block boundary) into
    ``shape``. Its scales are ``absmax[block0:]``: fp32, or with ``nested = (absmax2, code2,
    offset, blocksize2)`` the uint8 codes of bitsandbytes' double quant (``block0`` indexes the
    whole stack's blocks, so a range of experts needs no sliced copy of the scales)."""
    if triton is None:
        raise RuntimeError("dequantize_nf4_triton: triton is not installed")
    n = 1
    for s in shape:
        n *= s
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes = (n + 1) // 2
    if n_bytes:
        absmax2, code2, offset, blocksize2 = nested if nested is not None else (
            absmax, absmax, absmax, 1)  # unused pointers when not nested
        bytes_per_prog = 1024
        grid = (triton.cdiv(n_bytes, bytes_per_prog),)
        _nf4_dequant_kernel[grid](packed.reshape(-1), absmax, _code(packed.device), absmax2,
                                  code2, offset, out, n, n_bytes, block0, BLOCKSIZE=blocksize,
                                  BLOCKSIZE2=blocksize2, NESTED=nested is not None,
                                  BYTES=bytes_per_prog, enable_fp_fusion=False)
    return out
