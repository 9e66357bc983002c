"""Which implementation runs the expert path: Triton kernels on CUDA, or torch.

``GROUPMOE_BACKEND`` / :func:`set_backend`:

* ``auto`` (default): for CUDA tensors with Triton installed, the kernels that measured faster
  than torch on an H100 (benchmarks/RESULTS.md): fused activation + router weight, gather-sum
  combine, the bias gradients (gate_up's segment sum, down's with the router weight's)
  always; the fused gather + grouped GEMM forward (:mod:`groupmoe.kernels.grouped`) for
  experts with a down bias (gpt-oss: 1.38x forward, 1.10x forward+backward), where its
  epilogue absorbs the bias and activation passes, with the torch backward. torch grouped_mm
  for the rest (on par or faster there). torch everywhere else.
* ``torch``: torch only (grouped_mm and elementwise ops): the reference.
* ``triton``: every Triton kernel, the fused-GEMM forward and backward
  (:mod:`groupmoe.kernels.grouped_bwd`) included; and, under
  ``TRITON_INTERPRET=1``, the kernels on CPU tensors (how the CPU tests check them).

fp64 always runs torch (the kernels accumulate in fp32).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from ..kernels import interpreting, triton_available
from .checks import check

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("GROUPMOE_BACKEND", "auto")
check(_backend in BACKENDS, f"GROUPMOE_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def set_backend(name: Backend) -> None:
    """Set the process-wide backend: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _backend
    check(name in BACKENDS, f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The process-wide backend (``GROUPMOE_BACKEND`` or the last :func:`set_backend`)."""
    return _backend


def use_triton(t: torch.Tensor) -> bool:
    """Whether the elementwise/reduction Triton kernels should handle this tensor."""
    if _backend == "torch" or t.dtype == torch.float64:
        return False
    if t.is_cuda:
        if triton_available():
            return True
        check(_backend != "triton", "GROUPMOE_BACKEND=triton but triton is not installed")
        return False
    return _backend == "triton" and interpreting() and triton_available()


# Activation.name of the forms the fused-GEMM Triton kernels implement in their epilogues (the
# standalone activation kernel takes every form)
FUSED_ACTIVATIONS = ("swiglu", "gptoss")


def _gemm_unsupported(x: torch.Tensor, act) -> str | None:
    """Why the fused-GEMM Triton forward cannot run these inputs, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if not (x.is_cuda or interpreting()):
        return "inputs are not on a CUDA device (and TRITON_INTERPRET is not set)"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {x.dtype} (want bfloat16, float16 or float32)"
    if act.name not in FUSED_ACTIVATIONS:
        return f"activation {act.name!r} has no fused kernel (swiglu and gptoss do)"
    return None


def resolve_backend(backend: str | None, x: torch.Tensor, act, down_bias: bool = False) -> str:
    """What runs the expert MLP of this call: ``"triton"`` (fused-GEMM forward and backward),
    ``"triton-forward"`` (fused-GEMM forward, torch backward) or ``"torch"``.

    ``backend`` (per call) overrides the process default. ``"triton"`` raises when the kernels
    cannot run these inputs; ``"auto"`` takes the forward for bf16/fp16 CUDA experts with a
    down bias. Decided from dtypes, devices and module constants only, so torch.compile
    traces it (and guards on the process default) without a graph break.
    """
    backend = _backend if backend is None else backend
    check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        why = _gemm_unsupported(x, act)
        check(why is None, f"expert_mlp: backend='triton' cannot run: {why}")
        return "triton"
    fits = (down_bias and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and triton_available() and act.name in FUSED_ACTIVATIONS)
    return "triton-forward" if fits else "torch"
