"""Which kernels run the expert MLP forward: torch (grouped_mm; the reference) or Triton.

The process default comes from ``GROUPMOE_BACKEND`` (``torch`` unless set) and
:func:`set_backend`; :func:`~groupmoe.ops.expert_mlp` takes a per-call ``backend``.
``"auto"`` picks Triton for bf16/fp16 CUDA inputs when Triton is installed, torch otherwise.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from ..kernels import interpreting, triton_available
from .activations import Activation, GptOssGLU, SwiGLU
from .checks import check

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")

_default: str = os.environ.get("GROUPMOE_BACKEND", "torch")
check(_default in BACKENDS, f"GROUPMOE_BACKEND must be one of {BACKENDS}, got {_default!r}")


def set_backend(backend: Backend) -> None:
    """Set the process-wide default backend of the expert MLP."""
    global _default
    check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _default = backend


def get_backend() -> str:
    return _default


def _triton_unsupported(x: torch.Tensor, act: Activation) -> str | None:
    """Why the Triton path cannot run these inputs, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if not (x.is_cuda or interpreting()):
        return "inputs are not on a CUDA device (and TRITON_INTERPRET is not set)"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {x.dtype} (want bfloat16, float16 or float32)"
    if type(act) not in (SwiGLU, GptOssGLU):
        return f"activation {act.name!r} has no fused kernel (swiglu and gptoss do)"
    return None


def resolve_backend(backend: str | None, x: torch.Tensor, act: Activation) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for one call."""
    backend = _default if backend is None else backend
    check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    why = _triton_unsupported(x, act)
    if backend == "triton":
        check(why is None, f"expert_mlp: backend='triton' cannot run: {why}")
        return "triton"
    if why is None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return "triton"
    return "torch"
