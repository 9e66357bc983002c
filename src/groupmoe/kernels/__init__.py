"""Triton kernels for CUDA tensors (or Triton's CPU interpreter with ``TRITON_INTERPRET=1``).

Nothing here imports Triton at package import: :func:`triton_available` checks lazily, and a
kernel module is imported only where :mod:`groupmoe.ops.backend` chose Triton. The torch
paths in :mod:`groupmoe.ops` are the reference and the CPU implementation.
"""

from __future__ import annotations

import importlib.util
import os

# looked up once at import: a plain module constant, which torch.compile reads without a
# graph break (it cannot trace a functools.cache lookup)
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton can be imported (not whether a GPU is present)."""
    return _TRITON


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``); Triton reads
    the variable when a kernel module is first imported, so set it before that."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
