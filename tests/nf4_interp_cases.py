"""NF4 Triton dequantize kernel cases, run by test_quant_lora.py under TRITON_INTERPRET=1 in a
subprocess (see interp_runner.py). Each returns the largest error against the torch backend.

fp32/fp16 must be exact; the interpreter truncates to bf16 where CUDA rounds to nearest, so bf16
is measured in ulps relative to the value (<= 1 here, exact in the GPU test)."""

import sys

import torch

from groupmoe.quant import absmax_fp32, dequantize_nf4, dequantize_nf4_experts, quantize_nf4
from groupmoe.quant.nf4_triton import dequantize_nf4_triton
from interp_runner import print_case_results


def case_dequant(nested: bool, dtype: torch.dtype) -> float:
    # 50 x 70 = 3500 elements per expert: expert ranges start and end inside 64-blocks
    w = torch.randn(3, 50, 70) * (torch.rand(3, 1, 1) * 3 + 0.1)
    t = quantize_nf4(w, nested=nested)
    got = dequantize_nf4(t, dtype, backend="triton")  # nested scales inside the kernel
    ref = dequantize_nf4(t, dtype, backend="torch")
    flat = dequantize_nf4_triton(t.packed, absmax_fp32(t), t.shape, t.blocksize, dtype)
    worst = float((flat.float() - got.float()).abs().max())  # given fp32 scales: the same
    for start, stop in ((1, 3), (2, 3), (0, 1)):
        part = dequantize_nf4_experts(t, start, stop, dtype, backend="triton")
        worst = max(worst, float((part.float() - got[start:stop].float()).abs().max()))
    diff = (got.float() - ref.float()).abs()
    if dtype == torch.bfloat16:
        diff = diff / (ref.float().abs() * 2 ** -7).clamp_min(1e-30)
        return max(worst, float(diff.max()) - 1.0 if float(diff.max()) > 1.0 else 0.0)
    return max(worst, float(diff.max()))


CASES = {f"{'nested' if nested else 'plain'}-{str(dtype)[6:]}": (
    case_dequant, dict(nested=nested, dtype=dtype), 0.0)
    for nested in (False, True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)}


if __name__ == "__main__":
    print_case_results(CASES, sys.argv[1:] or None)
