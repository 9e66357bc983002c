"""Recognise a transformers experts module's activation as a groupmoe :class:`Activation`.

transformers' experts classes compute their activation in ``_apply_gate`` (gated experts) or
``act_fn`` (experts without a gate), with parameters in attributes (``limit``,
``swiglu_limit``, ``alpha``, ``swiglu_alpha``) and sometimes in fp32. The module's own
function is the truth: candidates built from those attributes are run against it on random
inputs (clamps hit on both sides) and the first that agrees is taken; whether it computes in
fp32 is read off a bf16 probe (which roundings it reproduces exactly). The search is cached per
class and attribute values; every module still checks the chosen form on its own function.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
from torch import nn

from ..ops.activations import FNS, Activation, fn_value

_LIMITS = ("limit", "swiglu_limit")
_ALPHAS = ("alpha", "swiglu_alpha")
_found: dict[tuple, Activation | None] = {}


def _number(module: nn.Module, names: tuple[str, ...]) -> float | None:
    for name in names:
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v)
    return None


def own_activation(module: nn.Module):
    """The module's own activation, ``h -> a``."""
    return module._apply_gate if module.has_gate else module.act_fn


def _probe(gated: bool, scale: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(16, 24 if gated else 12, generator=g, dtype=torch.float64) * scale
            ).to(dtype)


def _agrees(act: Activation, own, h: torch.Tensor, exact: bool = False) -> bool:
    try:
        with torch.no_grad():
            want = own(h)
    except Exception:  # a function that cannot run on a CPU probe is not one of ours
        return False
    got = act(h)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return False
    if exact:
        return torch.equal(got, want.to(got.dtype))
    return torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def _fns(module: nn.Module, alpha: float | None) -> list[str]:
    """``act_fn``'s form when it has one of ours, else every form."""
    act_fn = getattr(module, "act_fn", None)
    if act_fn is not None:
        x = torch.linspace(-6, 6, 97)
        for fn in FNS:
            try:
                with torch.no_grad():
                    same = torch.allclose(act_fn(x), fn_value(fn, x, alpha or 1.0), atol=1e-6)
            except Exception:
                break
            if same:
                return [fn]
    return [fn for fn in FNS if fn != "sigmoid_alpha" or alpha is not None]


def _candidates(module: nn.Module, limit: float | None, alpha: float | None):
    gated = bool(module.has_gate)
    layout = "concat" if getattr(module, "is_concatenated", True) else "interleaved"
    limits = (None,) if limit is None else (None, limit)
    for fn in _fns(module, alpha):
        a = alpha if fn == "sigmoid_alpha" else 1.0
        if not gated:
            for gl in limits:
                yield Activation(fn, gated=False, gate_limit=gl, alpha=a)
            continue
        for gl, ul, plus in itertools.product(limits, limits, (False, True)):
            yield Activation(fn, layout=layout, gate_limit=gl, up_limit=ul, up_plus_one=plus,
                             alpha=a)


def recognise(module: nn.Module) -> Activation | None:
    """The :class:`Activation` equal to ``module``'s own (checked on random inputs), or
    ``None`` when none of groupmoe's forms is."""
    own = own_activation(module)
    limit, alpha = _number(module, _LIMITS), _number(module, _ALPHAS)
    act_fn = getattr(module, "act_fn", None)
    key = (type(module), limit, alpha, type(act_fn), getattr(module, "is_concatenated", None))
    scale = 2.0 * limit if limit else 4.0
    h32, h16 = _probe(module.has_gate, scale, torch.float32), _probe(
        module.has_gate, scale, torch.bfloat16)
    act = _found.get(key)
    if act is not None and _agrees(act, own, h32) and _agrees(act, own, h16, exact=True):
        return act
    act = next((c for c in _candidates(module, limit, alpha) if _agrees(c, own, h32)), None)
    if act is not None:
        # which roundings: the model computing in bf16, or in fp32 and rounding once
        exact = [c for c in (act, replace(act, fp32=True)) if _agrees(c, own, h16, exact=True)]
        act = exact[0] if exact else act
    _found[key] = act
    return act
