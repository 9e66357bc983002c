"""Triton kernels against the torch ops: on CPU through Triton's interpreter, on a GPU natively.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (module import), and another test
may already have imported the kernels in this process, so the interpreter cases run once in a
subprocess started with the variable set (and no visible GPU); each case is then one test here.
"""

import os

import pytest
import torch

from groupmoe.kernels import triton_available
from groupmoe.ops import build_routing, expert_mlp, set_backend
from interp_runner import assert_case, run_interpreted
from kernel_cases import CASES, case_act, case_combine, case_expert_mlp, case_gemm
from moe_cases import make_ids

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("kernel_cases.py")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter(interpreted, name):
    assert_case(interpreted, CASES, name)


def test_backend_selection_errors():
    x = torch.randn(4, 8)
    routing = build_routing(make_ids(4, 1, 2), 2)
    args = (x, routing, torch.rand(4, 1), torch.randn(2, 8, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        expert_mlp(*args, backend="cuda")
    if not os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            expert_mlp(*args, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("fast")
    # auto on CPU falls back to torch
    assert torch.allclose(expert_mlp(*args, backend="auto"), expert_mlp(*args, backend="torch"))


BF16 = torch.bfloat16
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("layout", ["in_out", "transposed"])
@pytest.mark.parametrize("load", ["random", "skewed"])
def test_gpu_gemm(layout, load):
    err = case_gemm(2048, 512, 384, 16, 4, load, BF16, "cuda", layout=layout, bias=True,
                    scatter=True)
    assert err < 1e-2


@gpu
@pytest.mark.parametrize("activation", ["swiglu", "gptoss"])
@pytest.mark.parametrize("store_h", [True, False])
def test_gpu_act(activation, store_h):
    assert case_act(2048, 512, 192, 16, 4, "skewed", BF16, activation, True, store_h,
                    device="cuda") < 1e-2
    assert case_act(300, 200, 72, 7, 2, "random", torch.float32, activation, True, store_h,
                    device="cuda") < 1e-4


@gpu
def test_gpu_combine():
    assert case_combine(4096, 2048, 8, BF16, True, "cuda") < 1e-2


@gpu
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True)])
@pytest.mark.parametrize("save", ["h", "none"])
def test_gpu_expert_mlp(activation, bias, save):
    err = case_expert_mlp(1024, 256, 128, 16, 4, "skewed", BF16, activation, bias, save,
                          device="cuda")
    assert err < 2e-2
