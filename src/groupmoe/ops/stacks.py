"""Expert weight stacks handed to the ops whole or as per-expert ``nn.Linear`` weights.

An op takes a stack as a list of tensors. ``[w]`` is one ``[E, in, out]`` stack (any strides,
e.g. the ``.transpose(-1, -2)`` view of an ``[E, out, in]`` parameter). ``E * p`` tensors are
per-expert ``nn.Linear`` weights ``[out_j, in]``, ``p`` per expert in expert order, whose
outputs concatenate (gate then up of a transformers 4.x ``ModuleList`` expert). Pieces are
stacked inside the op, in forward and again in backward, so no stacked copy is kept for
backward: also under torch.compile, where saved-tensor hooks cannot rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check

Stack = torch.Tensor | Sequence[torch.Tensor]


def as_list(w: Stack) -> list[torch.Tensor]:
    """A stack argument as the ops' list form."""
    return [w] if isinstance(w, torch.Tensor) else list(w)


def stack_shape(ws: Sequence[torch.Tensor], num_experts: int, where: str) -> tuple[int, ...]:
    """``(E, in, out)`` of a stack in list form, checking that pieces line up."""
    if len(ws) == 1:
        check(ws[0].dim() == 3, lambda: f"{where}: an expert stack must be 3-D [E, in, out], got "
              f"{tuple(ws[0].shape)}")
        return tuple(ws[0].shape)
    check(num_experts >= 1 and len(ws) % num_experts == 0,
          lambda: f"{where}: {len(ws)} weight pieces do not split evenly over {num_experts} "
          "experts")
    per = len(ws) // num_experts
    check(all(w.dim() == 2 for w in ws), f"{where}: per-expert weights must be 2-D [out, in]")
    outs = [w.shape[0] for w in ws[:per]]
    check(all(list(w.shape) == [outs[i % per], ws[0].shape[1]] for i, w in enumerate(ws)),
          f"{where}: per-expert weights differ in shape across experts")
    return (num_experts, ws[0].shape[1], sum(outs))


def is_transposed(ws: Sequence[torch.Tensor]) -> bool:
    """Whether the assembled ``[E, in, out]`` stack is a transposed view of ``[E, out, in]``
    storage (pieces always are): weight gradients are then made in that layout too."""
    if len(ws) > 1:
        return True
    w = ws[0]
    return w.stride(-2) == 1 and w.stride(-1) != 1


def assemble(ws: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """The ``[E, in, out]`` stack (``ws[0]`` itself, or the pieces in one copy)."""
    if len(ws) == 1:
        return ws[0]
    rows = sum(w.shape[0] for w in ws[: len(ws) // num_experts])
    return torch.cat(list(ws)).view(num_experts, rows, ws[0].shape[1]).transpose(-1, -2)


def split_grad(dw: torch.Tensor, ws: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of each list entry from the gradient ``dw`` of the assembled stack."""
    if len(ws) == 1:
        return [dw]
    flat = dw.transpose(-1, -2).reshape(-1, dw.shape[1])
    return list(torch.split(flat, [w.shape[0] for w in ws]))
