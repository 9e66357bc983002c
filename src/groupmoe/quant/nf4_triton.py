"""Triton kernel: NF4 bytes + fp32 block scales -> a dense stack, one launch for all experts.

Imported lazily; ``available()`` says whether it can run on CUDA here. Under
``TRITON_INTERPRET=1`` it also runs on CPU tensors (used by the tests).
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
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, n_bytes,
                            BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        # both elements of a byte share a block: blocksize is even
        scale = tl.load(absmax_ptr + (offs * 2) // BLOCKSIZE, mask=mask, other=0.0)
        vals = tl.interleave(hi * scale, lo * scale)  # fp32 products, one rounding on store
        eoffs = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + eoffs, vals.to(out_ptr.dtype.element_ty), mask=eoffs < n)


@functools.cache
def _code(device: torch.device) -> torch.Tensor:
    return _nf4_code(device)


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                          blocksize: int, dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``packed`` (uint8, high nibble first) with fp32 ``absmax`` into ``shape``."""
    if triton is None:
        raise RuntimeError("dequantize_nf4_triton: triton is not installed")
    n = 1
    for s in shape:
        n *= s
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes = (n + 1) // 2
    if n_bytes:
        bytes_per_prog = 1024
        grid = (triton.cdiv(n_bytes, bytes_per_prog),)
        _nf4_dequant_kernel[grid](packed.reshape(-1), absmax, _code(packed.device), out, n,
                                  n_bytes, BLOCKSIZE=blocksize, BYTES=bytes_per_prog)
    return out
