"""FP8 (e4m3) grouped GEMMs with rowwise scales: the expert MLP's forward and dX GEMMs at
``precision="fp8"``.

Each operand is quantized along the contraction dimension with one power-of-two scale per row
(activations: per token row; weights: per expert and output column), so dequantizing is exact
and only the e4m3 rounding of the operands (3 mantissa bits) differs from the high-precision
product. Values beyond e4m3's range are scaled into it, never saturated to NaN.

On Hopper/Blackwell CUDA (capability 9.0 or 10.0) the product runs on
``torch._scaled_grouped_mm`` (fp32 accumulation, bf16 output) and the quantization through
``torch.compile`` (fused by Inductor); on CPU the same numerics are
emulated (quantize, dequantize exactly, multiply in fp32) so the suite tests them. Elsewhere
FP8 is an error, never a silent high-precision product.
"""

from __future__ import annotations

import functools

import torch

from .checks import check
from .grouped_gemm import cuda_capability, grouped_mm

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# amax floor: an all-zero row gets a finite scale (its data is zero whatever the scale); the
# scale and its inverse stay normal fp32 numbers (rows below ~1e-30 flush to zero)
_AMAX_FLOOR = 2.0 ** -100


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, inv_scale)``: ``x`` in e4m3 with one power-of-two scale per row of its last
    dimension, ``x ~= data * inv_scale[..., None]``; ``data`` contiguous like ``x``'s shape,
    ``inv_scale`` fp32 with the last dimension dropped."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_AMAX_FLOOR)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))  # largest power of 2 that fits
    # a power-of-two scale is exact in bf16/fp32 (8 exponent bits): scale there, no fp32 copy
    # of a bf16 weight stack; fp16 (5 exponent bits) scales in fp32
    work = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
    data = (x.to(work) * scale.to(work)).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return data.contiguous(), scale.reciprocal().squeeze(-1)


@functools.cache
def _compiled_quantize():
    # on CUDA Inductor fuses the row reduction, the scaling and the cast into one or two
    # kernels (bit-identical to the eager ops); compiled once, dynamic in every size
    return torch.compile(quantize_rowwise, dynamic=True)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _compiled_quantize()(x) if x.is_cuda else quantize_rowwise(x)


def fp8_unsupported(a: torch.Tensor, k: int, n: int) -> str | None:
    """Why an FP8 grouped GEMM with contraction ``k`` and output width ``n`` cannot run on
    ``a``'s device, or ``None``."""
    if a.device.type in ("cpu", "meta"):  # emulated; meta: shapes only (tracing)
        return None
    if not a.is_cuda:
        return f"device {a.device} (CUDA or CPU only)"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return "this torch has no torch._scaled_grouped_mm"
    if cuda_capability(a.device.index) not in ((9, 0), (10, 0)):
        return (f"GPU capability {cuda_capability(a.device.index)}: torch's FP8 grouped GEMM "
                "needs 9.0 (Hopper) or 10.0 (Blackwell)")
    if k % 16 or n % 16:
        return f"sizes {k} x {n}: FP8 GEMMs need multiples of 16"
    return None


def fp8_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``grouped_mm(a [M, K], b [G, K, N], offs)`` with both operands in e4m3 (rowwise along
    ``K``), accumulated in fp32, returned in ``out_dtype``."""
    check(a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1],
          lambda: f"fp8_grouped_mm: want a [M, K] and b [G, K, N], got {tuple(a.shape)} and "
          f"{tuple(b.shape)}")
    why = fp8_unsupported(a, a.shape[1], b.shape[2])
    check(why is None, lambda: f"precision='fp8' cannot run: {why}")
    a_q, a_inv = _quantize(a)
    bt_q, b_inv = _quantize(b.transpose(-1, -2))  # [G, N, K]: per output column
    if a.device.type == "cpu":
        a_deq = a_q.float() * a_inv.unsqueeze(-1)  # exact: power-of-two scales
        b_deq = (bt_q.float() * b_inv.unsqueeze(-1)).transpose(-1, -2)
        return grouped_mm(a_deq, b_deq.contiguous(), offs).to(out_dtype)
    # the right operand column-major, as the kernel wants; it writes bf16 only
    out = torch._scaled_grouped_mm(a_q, bt_q.transpose(-1, -2), a_inv, b_inv, offs=offs,
                                   out_dtype=torch.bfloat16, use_fast_accum=True)
    return out.to(out_dtype)
