"""The fused dbias/dprob kernel of the gate-scaled down bias against the torch formula."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groupmoe.kernels import triton_available
from groupmoe.ops import backend, bias_prob_grads, build_routing
from moe_cases import make_ids, rel_err

HERE = Path(__file__).parent
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check; CUDA runs the real kernel")
def test_bias_prob_kernel_under_triton_interpreter():
    # A fresh process: TRITON_INTERPRET must be set before triton is first imported, which
    # another test module may already have done in this one.
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "interp_bias_prob_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "interp-ok" in proc.stdout, proc.stderr[-3000:]


@needs_triton
def test_bias_prob_kernel_validates_inputs():
    from groupmoe.kernels.bias_prob import bias_prob_grads as kernel

    r = build_routing(make_ids(6, 2, 4), 4)
    dy, prob, bias = torch.randn(12, 8), torch.randn(12), torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias must be"):
        kernel(dy, prob, torch.randn(4, 9), r.offsets, r.expert_index)
    with pytest.raises(ValueError, match="prob must be"):
        kernel(dy, prob[:5], bias, r.offsets, r.expert_index)
    with pytest.raises(ValueError, match="offsets must be int32 or int64"):
        kernel(dy, prob, bias, r.offsets.float(), r.expert_index)
    with pytest.raises(ValueError, match="offsets must be"):
        kernel(dy, prob, bias, r.offsets[:3], r.expert_index)


def test_torch_path_is_fp32_and_exact_for_bf16():
    """The CPU path: fp32 outputs from bf16 inputs, equal to the fp64 formula to fp32 rounding."""
    r = build_routing(make_ids(20, 2, 6, "skewed"), 6)
    dy = torch.randn(40, 13).bfloat16()
    prob, bias = torch.randn(40), torch.randn(6, 13).bfloat16()
    db, dp = bias_prob_grads(dy, prob, bias, r)
    assert db.dtype == dp.dtype == torch.float32
    ref_db = torch.zeros(6, 13, dtype=torch.float64).index_add_(
        0, r.expert_index, dy.double() * prob.double()[:, None])
    assert rel_err(db, ref_db) < 1e-6
    assert rel_err(dp, (dy.double() * bias.double()[r.expert_index]).sum(1)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,load", [(torch.float16, "single"), (torch.float32, "random"),
                                        (torch.bfloat16, "skewed")])
def test_bias_prob_kernel_at_gpt_oss_size_on_cuda(dtype, load):
    """H=2880, E=32, N=32768 rows (fp16 with two experts holding every row, fp32, and bf16
    with half the experts empty), with a non-contiguous dy, against the torch formula."""
    t, k = 16384, 2
    r = build_routing(make_ids(t, k, 32, load).cuda(), 32)
    dy = torch.randn(t * k, 2880 + 64, device="cuda", dtype=dtype)[:, :2880]
    prob = torch.rand(t * k, device="cuda")
    bias = torch.randn(32, 2880, device="cuda", dtype=dtype)
    db, dp = bias_prob_grads(dy, prob, bias, r)
    backend.set_backend("torch")
    try:
        rdb, rdp = bias_prob_grads(dy, prob, bias, r)
    finally:
        backend.set_backend("auto")
    assert db.dtype == dp.dtype == torch.float32
    assert rel_err(db, rdb) < 1e-5 and rel_err(dp, rdp) < 1e-5
