"""Gated activations of expert MLPs, each with a hand-written backward.

``h`` is the gate_up projection ``[rows, 2I]``; the result is ``[rows, I]``. The explicit
backward lets fused autograd Functions keep only ``h`` on the tape (or nothing) instead of
every intermediate that plain autograd would save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dtypes import to_accum


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
        gate, up = (to_accum(t) for t in self.split(h))
        da = to_accum(da)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dgate = da * up * sig * (1 + gate * (1 - sig))
        dup = da * silu
        return torch.cat([dgate, dup], dim=-1).to(h.dtype)


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
        gate_raw, up_raw = (to_accum(t) for t in self.split(h))
        da = to_accum(da)
        gate = gate_raw.clamp(max=self.limit)
        up = up_raw.clamp(min=-self.limit, max=self.limit)
        sig = torch.sigmoid(gate * self.alpha)
        glu = gate * sig
        # clamp passes gradient only where the input was inside the range (torch's convention)
        dgate = da * (up + 1) * sig * (1 + self.alpha * gate * (1 - sig))
        dgate = dgate * (gate_raw <= self.limit)
        dup = da * glu * ((up_raw >= -self.limit) & (up_raw <= self.limit))
        return torch.stack([dgate, dup], dim=-1).flatten(-2).to(h.dtype)


ACTIVATIONS: dict[str, Activation] = {"swiglu": SwiGLU(), "gptoss": GptOssGLU()}


def get_activation(act: str | Activation) -> Activation:
    """Look an activation up by name (``"swiglu"``, ``"gptoss"``) or pass one through."""
    if isinstance(act, Activation):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}") from None
