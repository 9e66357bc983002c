"""Triton kernels against the torch ops: on CPU through Triton's interpreter, on a GPU natively.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (module import), and another test
may already have imported the kernels in this process, so the interpreter cases run once in a
subprocess started with the variable set (and no visible GPU); each case is then one test here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import groupmoe
from groupmoe.kernels import triton_available
from groupmoe.ops import build_routing, expert_mlp, set_backend
from kernel_cases import CASES, case_act, case_combine, case_expert_mlp, case_gemm
from moe_cases import make_ids

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def interpreted():
    src = Path(groupmoe.__file__).parent.parent  # test the package this process imports
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(src), str(TESTS_DIR),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "kernel_cases.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter(interpreted, name):
    err = interpreted[name]
    assert not isinstance(err, str), err
    assert err <= CASES[name][2], err


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
