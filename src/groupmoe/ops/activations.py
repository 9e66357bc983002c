"""Gated activations of expert MLPs, each with a hand-written backward.

``h`` is the gate_up projection ``[rows, 2I]``; the result is ``[rows, I]``. The explicit
backward lets fused autograd Functions keep only ``h`` on the tape (or nothing) instead of
every intermediate that plain autograd would save.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .backend import use_triton
from .dtypes import accum_dtype
from .library import custom_op


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

    def __post_init__(self):
        # made once here, in eager code: torch.compile cannot trace the string formatting
        params = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "name"]
        object.__setattr__(self, "_spec",
                           f"{self.name}({','.join(params)})" if params else self.name)

    @property
    def spec(self) -> str:
        """How custom ops receive the activation: ``name`` or ``name(param=value,...)``;
        :func:`activation_from_spec` inverts it."""
        return self._spec


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


@functools.cache
def activation_from_spec(spec: str) -> Activation:
    """The :class:`Activation` whose :attr:`~Activation.spec` is ``spec``."""
    name, _, params = spec.partition("(")
    act = get_activation(name)
    kw = dict(p.split("=") for p in params.rstrip(")").split(",") if p)
    return replace(act, **{k: float(v) for k, v in kw.items()}) if kw else act


@custom_op("gated_act")
def _gated_act_op(h: torch.Tensor, act: str) -> torch.Tensor:
    return activation_from_spec(act)(h)


@_gated_act_op.register_fake
def _(h, act):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@custom_op("gated_act_backward")
def _gated_act_backward_op(h: torch.Tensor, da: torch.Tensor, act: str) -> torch.Tensor:
    return activation_from_spec(act).backward(h, da.contiguous())


@_gated_act_backward_op.register_fake
def _(h, da, act):
    return torch.empty_like(h)


def _gated_act_setup(ctx, inputs, output):
    h, act = inputs
    ctx.act = act
    ctx.save_for_backward(h)


def _gated_act_backward(ctx, da):
    (h,) = ctx.saved_tensors
    return _gated_act_backward_op(h, da, ctx.act), None


_gated_act_op.register_autograd(_gated_act_backward, setup_context=_gated_act_setup)


def gated_act(h: torch.Tensor, act: str | Activation) -> torch.Tensor:
    """``act(h)`` as one autograd node that keeps only ``h`` (the hand-written backward)."""
    return _gated_act_op(h, get_activation(act).spec)


def scaled_forward(act: Activation, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * act(h)``: the router weight applied before the down projection."""
    if use_triton(h):
        from ..kernels.activation import act_scaled_forward

        return act_scaled_forward(act, h, g)
    return act(h).mul_(g.to(h.dtype).unsqueeze(1))


def scaled_backward(
    act: Activation, h: torch.Tensor, g: torch.Tensor, da_scaled: torch.Tensor,
    want_a_scaled: bool, want_dg: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`scaled_forward` given ``da_scaled``, the gradient of its output.

    Returns ``dh``, ``g * act(h)`` (if asked, for the down weight's gradient) and
    ``dg = <da_scaled, act(h)>`` accumulated in fp32 (if asked). May overwrite ``da_scaled``.
    """
    if use_triton(h):
        from ..kernels.activation import act_scaled_backward

        dh, a_scaled, dg = act_scaled_backward(act, h, g, da_scaled, want_a_scaled)
        return dh, a_scaled, (dg.to(accum_dtype(h.dtype)) if want_dg else None)
    a = act(h)
    gc = g.to(a.dtype).unsqueeze(1)
    dg = (da_scaled * a).sum(1, dtype=accum_dtype(a.dtype)) if want_dg else None
    a_scaled = a.mul_(gc) if want_a_scaled else None
    del a
    return act.backward(h, da_scaled.mul_(gc)), a_scaled, dg
