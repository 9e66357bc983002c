"""Triton kernels for the expert path (GPU; or the CPU interpreter with ``TRITON_INTERPRET=1``).

Nothing here imports Triton at package import: :func:`triton_available` checks lazily, and the
kernels live in :mod:`groupmoe.kernels.grouped` (import it only where Triton is installed).
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (not whether a GPU is present)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is decorated, i.e. when
    :mod:`groupmoe.kernels.grouped` is first imported; set it before that.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
