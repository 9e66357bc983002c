"""Expert MLP activations (one parameterised :class:`Activation`), with a hand-written
backward.

``h`` is the gate_up projection ``[rows, 2I]`` (or the up projection ``[rows, I]`` of experts
without a gate); the result is ``[rows, I]``. The explicit backward lets fused autograd
Functions keep only ``h`` on the tape (or nothing) instead of every intermediate that plain
autograd would save.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .backend import use_triton
from .checks import check
from .dtypes import accum_dtype
from .library import custom_op, differentiable

FNS = ("silu", "gelu_tanh", "gelu", "relu", "relu2", "sigmoid_alpha")
LAYOUTS = ("concat", "interleaved")


def fn_value(fn: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    if fn == "silu":
        return F.silu(x)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if fn == "gelu":
        return F.gelu(x)
    if fn == "relu":
        return F.relu(x)
    if fn == "relu2":
        return F.relu(x).square()
    return x * torch.sigmoid(x * alpha)  # sigmoid_alpha


def fn_grad(fn: str, x: torch.Tensor, alpha: float, dy: torch.Tensor) -> torch.Tensor:
    """``dy * fn'(x)`` (aten's backward kernels where they exist: autograd's roundings)."""
    if fn == "silu":
        return torch.ops.aten.silu_backward(dy, x)
    if fn in ("gelu_tanh", "gelu"):
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh" if fn == "gelu_tanh"
                                            else "none")
    if fn == "relu":
        return torch.ops.aten.threshold_backward(dy, x, 0)
    if fn == "relu2":
        return dy * F.relu(x).mul_(2)
    sig = torch.sigmoid(x * alpha)  # d/dx [x sigmoid(a x)] = sig + a x sig (1 - sig)
    return dy * (x * alpha * sig * (1 - sig) + sig)


@dataclass(frozen=True)
class Activation:
    """The activation between an expert's two projections, with a hand-written backward.

    Gated (``gated=True``): ``h`` is the gate_up projection ``[rows, 2I]`` whose halves are
    ``gate`` and ``up`` (``layout="concat"``: first and second half; ``"interleaved"``:
    alternate columns, as gpt-oss); the result is ``fn(gate') * up'`` with ``gate'`` clamped to
    ``<= gate_limit`` and ``up'`` to ``[-up_limit, up_limit]`` (each if set), plus one where
    ``up_plus_one``. Not gated: ``h`` is the up projection ``[rows, I]`` and the result
    ``fn(h')`` (clamped likewise). ``fn``: silu, gelu_tanh, gelu (erf), relu, relu2 (squared
    relu) or sigmoid_alpha (``x * sigmoid(alpha x)``). ``fp32``: computed in fp32 and cast back
    (models that upcast inside their activation). Clamps pass gradient where the input is
    inside the range, bounds included (torch's convention).
    """

    fn: str = "silu"
    gated: bool = True
    layout: str = "concat"
    gate_limit: float | None = None
    up_limit: float | None = None
    up_plus_one: bool = False
    alpha: float = 1.0
    fp32: bool = False

    def __post_init__(self):
        check(self.fn in FNS, f"activation fn must be one of {FNS}, got {self.fn!r}")
        check(self.layout in LAYOUTS, f"activation layout must be one of {LAYOUTS}, got "
              f"{self.layout!r}")
        check(self.gated or (self.up_limit is None and not self.up_plus_one),
              "an activation without a gate has no up half to clamp or shift")
        # made once here, in eager code: torch.compile cannot trace the string formatting
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        object.__setattr__(self, "_spec", f"act({','.join(changed)})")
        object.__setattr__(self, "_name", "swiglu" if not changed else _preset_name(self))

    @property
    def spec(self) -> str:
        """How custom ops receive the activation (``act(field=value,...)``, the fields that
        differ from the defaults); :func:`activation_from_spec` inverts it."""
        return self._spec

    @property
    def name(self) -> str:
        """``"swiglu"``, ``"gptoss"`` (the forms with fused Triton kernels), ``"glu"`` for any
        other gated activation, ``"mlp"`` for one without a gate."""
        return self._name

    def out_width(self, width: int) -> int:
        """Columns of the result for ``width`` columns of ``h``."""
        return width // 2 if self.gated else width

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` views of a gated ``h``."""
        if self.layout == "interleaved":
            return h[..., ::2], h[..., 1::2]
        return h.chunk(2, dim=-1)

    def _parts(self, h: torch.Tensor):
        gate, up = self.split(h) if self.gated else (h, None)
        if self.fp32:
            gate, up = gate.float(), (None if up is None else up.float())
        g = gate if self.gate_limit is None else gate.clamp(max=self.gate_limit)
        u = up
        if up is not None and self.up_limit is not None:
            u = up.clamp(min=-self.up_limit, max=self.up_limit)
        if self.up_plus_one:
            u = u + 1
        return gate, up, g, u

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, _, g, u = self._parts(h)
        a = fn_value(self.fn, g, self.alpha)
        return (a if u is None else a * u).to(h.dtype)

    def backward(self, h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        """``dh`` for the gradient ``da`` of the result, written into one buffer like ``h``:
        in ``h``'s dtype (or fp32 with ``fp32``) with autograd's roundings, no fp32 copies of
        ``[rows, I]`` tensors otherwise."""
        gate, up, g, u = self._parts(h)
        if self.fp32:
            da = da.float()
        dh = torch.empty_like(h)
        dgate, dup = self.split(dh) if self.gated else (dh, None)
        if dup is not None:
            dup.copy_(da * fn_value(self.fn, g, self.alpha))
            if self.up_limit is not None:
                dup.masked_fill_(up.abs() > self.up_limit, 0)
        dgate.copy_(fn_grad(self.fn, g, self.alpha, da if u is None else da * u))
        if self.gate_limit is not None:
            dgate.masked_fill_(gate > self.gate_limit, 0)
        return dh

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward(h)


def SwiGLU() -> Activation:
    """``silu(gate) * up``, gate and up the first and second half of ``h``."""
    return Activation()


def GptOssGLU(alpha: float = 1.702, limit: float = 7.0) -> Activation:
    """gpt-oss: interleaved gate/up columns, clamped, ``(up + 1) * gate * sigmoid(alpha
    gate)``."""
    return Activation("sigmoid_alpha", layout="interleaved", gate_limit=limit, up_limit=limit,
                      up_plus_one=True, alpha=alpha)


def _preset_name(act: Activation) -> str:
    if not act.gated:
        return "mlp"
    if (act.fn == "sigmoid_alpha" and act.layout == "interleaved" and act.up_plus_one
            and act.gate_limit is not None and act.gate_limit == act.up_limit and not act.fp32):
        return "gptoss"
    return "glu"


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": SwiGLU(), "gptoss": GptOssGLU(), "geglu": Activation("gelu_tanh"),
    "relu2": Activation("relu2", gated=False)}


def get_activation(act: str | Activation) -> Activation:
    """Look an activation up by name (``"swiglu"``, ``"gptoss"``, ``"geglu"``, ``"relu2"``)
    or pass one through."""
    if isinstance(act, Activation):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}") from None


@functools.cache
def activation_from_spec(spec: str) -> Activation:
    """The :class:`Activation` whose :attr:`~Activation.spec` is ``spec``."""
    body = spec.removeprefix("act(").removesuffix(")")
    kw = {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in _fields_of(body))}
    return Activation(**kw)


def _fields_of(body: str) -> list[str]:
    # values are numbers, strings without commas, booleans or None: split on commas
    return [p for p in body.split(",") if p]


@custom_op("gated_act")
def _gated_act_op(h: torch.Tensor, act: str) -> torch.Tensor:
    return activation_from_spec(act)(h)


@_gated_act_op.register_fake
def _(h, act):
    return h.new_empty(*h.shape[:-1], activation_from_spec(act).out_width(h.shape[-1]))


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


_gated_act_autograd = differentiable(_gated_act_op, _gated_act_backward, _gated_act_setup)


def gated_act(h: torch.Tensor, act: str | Activation) -> torch.Tensor:
    """``act(h)`` as one autograd node that keeps only ``h`` (the hand-written backward)."""
    return _gated_act_autograd(h, get_activation(act).spec)


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
