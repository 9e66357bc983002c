"""Which implementation runs the fused pieces: Triton kernels on CUDA, torch elsewhere.

``GROUPMOE_BACKEND=auto`` (default) uses Triton for CUDA tensors when it is installed,
``torch`` never does, ``triton`` insists (and, under ``TRITON_INTERPRET=1``, runs the kernels
on CPU tensors too, which is how the CPU tests check them).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("GROUPMOE_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Choose ``"auto"``, ``"torch"`` or ``"triton"`` for the fused elementwise kernels."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels should handle this tensor (fp64 always runs torch: the
    kernels accumulate in fp32)."""
    if _backend == "torch" or t.dtype == torch.float64:
        return False
    if t.is_cuda:
        if triton_installed():
            return True
        if _backend == "triton":
            raise RuntimeError("GROUPMOE_BACKEND=triton but triton is not installed")
        return False
    return _backend == "triton" and _interpreting() and triton_installed()
