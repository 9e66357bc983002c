"""Keep tensors that can be rebuilt cheaply off the autograd tape: rebuild them in backward.

Used for dense weight stacks made on every forward (dequantized NF4 experts, the stacked
weights of ``ModuleList`` experts), which would otherwise stay saved until backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


class _Rebuild:
    """What a saved view of a dequantized stack becomes on the tape: how to make it again."""

    __slots__ = ("make", "size", "stride", "offset")

    def __init__(self, make: Callable[[], torch.Tensor], t: torch.Tensor):
        self.make, self.size, self.stride = make, t.size(), t.stride()
        self.offset = t.storage_offset()


@contextlib.contextmanager
def recompute_saved(stacks: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]):
    """Within the block, tensors saved for backward that view one of ``stacks`` (a dense
    tensor and the function that rebuilds it) are not kept; backward calls the function."""
    ptrs = {w.untyped_storage().data_ptr(): make for w, make in stacks}

    def pack(t):
        make = ptrs.get(t.untyped_storage().data_ptr()) if t.numel() else None
        return _Rebuild(make, t) if make is not None else t

    def unpack(p):
        if isinstance(p, _Rebuild):
            return p.make().as_strided(p.size, p.stride, p.offset)
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
