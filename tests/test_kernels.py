"""Triton kernels: CPU check under the Triton interpreter, GPU checks on CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groupmoe.kernels import triton_available
from groupmoe.ops import Activation, backend, get_activation
from groupmoe.ops.activations import scaled_backward, scaled_forward
from moe_cases import rel_err

HERE = Path(__file__).parent


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check; CUDA runs the real kernels")
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", GROUPMOE_BACKEND="triton",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "interp_kernels_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "interp-ok" in proc.stdout, proc.stderr[-3000:]


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("cuda")
    assert not backend.use_triton(torch.zeros(1))  # CPU tensors run torch outside the interpreter


GPU_ACTS = {"swiglu": "swiglu", "gptoss": "gptoss", "geglu": "geglu", "relu2": "relu2",
            "gelu-erf": Activation("gelu"), "silu-clamped": Activation(gate_limit=7.0,
                                                                        up_limit=7.0)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_ACTS))
def test_kernels_match_torch_on_cuda(name):
    act = get_activation(GPU_ACTS[name])
    width = (2 if act.gated else 1) * 1000
    h = (torch.randn(4099, width, device="cuda") * 3).bfloat16()
    g = torch.rand(4099, device="cuda")
    da = torch.randn(4099, 1000, device="cuda").bfloat16()
    out = scaled_forward(act, h, g)
    dh, a, dg = scaled_backward(act, h, g, da.clone(), True, True)
    hf, daf = h.float(), da.float()
    backend.set_backend("torch")
    try:
        ref = scaled_forward(act, hf, g)
        ref_dh, ref_a, ref_dg = scaled_backward(act, hf, g, daf.clone(), True, True)
    finally:
        backend.set_backend("auto")
    assert rel_err(out, ref) < 5e-3 and rel_err(a, ref_a) < 5e-3
    assert rel_err(dh, ref_dh) < 5e-3 and rel_err(dg, ref_dg) < 1e-4



def test_activation_kernel_knows_every_function():
    """The kernel's function codes mirror ops.activations.FNS (kernels never import ops)."""
    pytest.importorskip("triton")
    from groupmoe.kernels.activation import _FN_CODES
    from groupmoe.ops.activations import FNS

    assert list(_FN_CODES) == list(FNS) and sorted(_FN_CODES.values()) == list(range(len(FNS)))
