"""Gated activations of expert MLPs, each with a hand-written backward.

``h`` is the gate_up projection ``[rows, 2I]``; the result is ``[rows, I]``. The explicit
backward lets fused autograd Functions keep only ``h`` on the tape (or nothing) instead of
every intermediate that plain autograd would save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """A gated activation: ``forward(h) -> a`` and ``backward(h, da) -> dh``."""

    name: str

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward(h)


@dataclass(frozen=True)
class SwiGLU(Activation):
    """``silu(gate) * up`` with ``gate, up`` the first and second half of ``h``."""

    name: str = "swiglu"

    def split(self, h):
        return h.chunk(2, dim=-1)

    def forward(self, h):
        gate, up = self.split(h)
        return F.silu(gate) * up

    def backward(self, h, da):
        # In h's dtype with the same roundings as autograd (silu_backward upcasts inside its
        # kernel), writing into one [rows, 2I] buffer: no fp32 copies of [rows, I] tensors.
        gate, up = self.split(h)
        dh = torch.empty_like(h)
        dgate, dup = self.split(dh)
        torch.mul(da, F.silu(gate), out=dup)
        dgate.copy_(torch.ops.aten.silu_backward(da * up, gate))
        return dh


@dataclass(frozen=True)
class GptOssGLU(Activation):
    """gpt-oss: interleaved gate/up columns, clamped, ``(up + 1) * gate * sigmoid(alpha*gate)``."""

    name: str = "gptoss"
    alpha: float = 1.702
    limit: float = 7.0

    def split(self, h):
        return h[..., ::2], h[..., 1::2]

    def forward(self, h):
        gate, up = self.split(h)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def backward(self, h, da):
        gate_raw, up_raw = self.split(h)
        gate = gate_raw.clamp(max=self.limit)
        sig = torch.sigmoid(gate * self.alpha)
        glu = gate * sig
        dh = torch.empty_like(h)
        dgate, dup = self.split(dh)
        # clamp passes gradient only where the input was inside the range (torch's convention)
        torch.mul(da, glu, out=dup)
        dup.masked_fill_(up_raw.abs() > self.limit, 0)
        # d/dgate [gate * sigmoid(alpha gate)] = sig + alpha * glu * (1 - sig)
        glu.mul_(1 - sig).mul_(self.alpha).add_(sig)
        up = up_raw.clamp(min=-self.limit, max=self.limit).add_(1)
        torch.mul(da * up, glu, out=dgate)
        dgate.masked_fill_(gate_raw > self.limit, 0)
        return dh


ACTIVATIONS: dict[str, Activation] = {"swiglu": SwiGLU(), "gptoss": GptOssGLU()}


def get_activation(act: str | Activation) -> Activation:
    """Look an activation up by name (``"swiglu"``, ``"gptoss"``) or pass one through."""
    if isinstance(act, Activation):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}") from None
