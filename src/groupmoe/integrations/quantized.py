"""4-bit (NF4) expert stacks of transformers 5 models on groupmoe's grouped path (QLoRA).

What transformers does (5.17 to 5.23 with bitsandbytes 0.50, read from its source and checked
on CPU): ``BitsAndBytesConfig(load_in_4bit=True)`` replaces ``nn.Linear`` modules (attention,
dense MLPs, shared experts) with ``Linear4bit``; the stacked 3-D expert parameters
(``gate_up_proj``, ``down_proj``), the bulk of an MoE model, are left in the model's dtype
(bitsandbytes issue #1849). "QLoRA" on such a model therefore quantizes attention only.
:func:`quantize_experts` closes the gap: it converts the expert stacks to NF4 in place.

Recognised 4-bit stack storage, wrapped as :class:`~groupmoe.quant.NF4Tensor` without a copy:

* groupmoe's own (:func:`quantize_experts`): the packed bytes are the parameter (``uint8``,
  frozen) under an :class:`NF4Parametrization` that holds the scales and dequantizes on
  access, so the model's own forward still runs (slowly) where groupmoe does not;
* bitsandbytes' ``replace_parameter_4bit`` (its ``Bnb4bitParametrization``, the same idea);
* a ``Params4bit`` stack whose ``quant_state`` keeps the 3-D shape.

Only NF4 runs grouped (plain or double-quantized absmax); bitsandbytes' FP4 stacks are
reported and keep the model's forward. peft LoRA on quantized stacks runs grouped only through
:func:`groupmoe.patch`: peft 0.21 itself cannot apply ``target_parameters`` LoRA to a
parametrized 4-bit stack (its ``ParamWrapper`` fails on the ``uint8`` original); the patch
lets the wrapper hand the call straight to the experts module, which reads the adapters
(:func:`groupmoe.integrations.transformers.patch` does so for every stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.activations import Activation
from ..quant.nf4 import NF4Tensor, dequantize_nf4, nest_absmax, quantize_nf4

STACKS = ("gate_up_proj", "down_proj")
_NF4_PARTS = ("absmax", "absmax2", "code2", "offset")


class NF4Parametrization(nn.Module):
    """Dequantizes a packed NF4 parameter on access (``torch.nn.utils.parametrize``).

    Holds an :class:`NF4Tensor`'s scales as buffers (they move with the module and appear in
    its ``state_dict`` under ``parametrizations.<name>.0.``); the packed bytes are the
    parametrization's ``original``.
    """

    def __init__(self, t: NF4Tensor):
        super().__init__()
        for name in _NF4_PARTS:
            self.register_buffer(name, getattr(t, name))
        self.shape, self.dtype = t.shape, t.dtype
        self.blocksize, self.blocksize2 = t.blocksize, t.blocksize2

    def _apply(self, fn, recurse=True):
        # follow device moves only: model.to(torch.bfloat16) must not cast the fp32 scales
        device = fn(torch.empty(0, device=self.absmax.device)).device
        for name in _NF4_PARTS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def nf4(self, packed: torch.Tensor) -> NF4Tensor:
        """The stack as an :class:`NF4Tensor` (views, no copy)."""
        return NF4Tensor(packed, self.absmax, self.shape, self.dtype, self.blocksize,
                         absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                         blocksize2=self.blocksize2)

    @torch.no_grad()
    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return dequantize_nf4(self.nf4(packed))


_SHARED_CLASSES: dict[tuple, type] = {}


def share_parametrized_class(module: nn.Module) -> None:
    """torch's parametrize gives every parametrized module a class of its own, so
    torch.compile's type guard fails on each next layer (a recompile per layer, then eager
    past the recompile limit). Modules of one base class with the same parametrized names
    get one shared class (its properties read each module's own parametrizations)."""
    if not nn.utils.parametrize.is_parametrized(module):
        return
    cls = type(module)
    key = (cls.__bases__[0], tuple(sorted(module.parametrizations.keys())))
    shared = _SHARED_CLASSES.setdefault(key, cls)
    if shared is not cls:
        module.__class__ = shared


def quantized_stack(module: nn.Module, name: str) -> NF4Tensor | str | None:
    """A 4-bit stack of ``module`` as an :class:`NF4Tensor`; ``None`` when it is not quantized;
    a reason (str) when it is quantized in a form groupmoe does not run."""
    plist = getattr(module, "parametrizations", {})
    if name in plist:
        first = plist[name][0]
        if isinstance(first, NF4Parametrization):
            if len(plist[name]) > 1:
                return f"{name}: further parametrizations on top of the NF4 stack"
            return first.nf4(plist[name].original)
        if type(first).__name__ == "Bnb4bitParametrization":
            if len(plist[name]) > 1:
                return f"{name}: further parametrizations on top of the 4-bit stack"
            return _from_bnb(plist[name].original, first.quant_state, name)
        return None
    param = getattr(module, name, None)
    if type(param).__name__ == "Params4bit":
        if getattr(param, "quant_state", None) is None:
            return f"{name}: bitsandbytes Params4bit not quantized yet (move it to its device)"
        return _from_bnb(param.data, param.quant_state, name)
    return None


def _from_bnb(packed: torch.Tensor, state, name: str) -> NF4Tensor | str:
    if state.quant_type != "nf4":
        return f"{name}: bitsandbytes {state.quant_type} 4-bit stacks (only nf4 runs grouped)"
    if len(state.shape) != 3:
        return f"{name}: 4-bit stack of shape {tuple(state.shape)} is not [E, ., .]"
    try:
        return NF4Tensor.from_bnb(packed, state)
    except ValueError as err:  # e.g. a blocksize groupmoe's kernels do not cover
        return f"{name}: {err}"


def quantized_stacks(module: nn.Module) -> tuple[NF4Tensor, NF4Tensor] | str | None:
    """Both stacks as NF4, ``None`` when neither is quantized, else why they cannot run."""
    q = [quantized_stack(module, name) for name in STACKS]
    reasons = [r for r in q if isinstance(r, str)]
    if reasons:
        return "; ".join(reasons)
    if all(r is None for r in q):
        return None
    if any(r is None for r in q):
        return "only one of gate_up_proj/down_proj is 4-bit"
    return q[0], q[1]


def describe(module: nn.Module) -> str | None:
    """A short description of a module's 4-bit stacks for reports (``None``: dense)."""
    q = quantized_stacks(module)
    if q is None or isinstance(q, str):
        return q
    plist = getattr(module, "parametrizations", {})
    source = "groupmoe" if STACKS[0] in plist and isinstance(
        plist[STACKS[0]][0], NF4Parametrization) else "bitsandbytes"
    nested = ", double-quantized absmax" if q[0].nested else ""
    return f"NF4 ({source}{nested}, blocksize {q[0].blocksize})"


def quantized_forward(module: nn.Module, stacks: tuple[NF4Tensor, NF4Tensor], act: Activation,
                      x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      lora) -> torch.Tensor:
    """The experts computation on NF4 stacks: dequantize a range of experts at a time (forward
    and backward, see :class:`QuantizedGroupedExperts`), grouped GEMMs, optional grouped LoRA.
    Biases stay the module's (trainable or not)."""
    from ..quant.experts import DEFAULT_CHUNK_BYTES, QuantizedGroupedExperts

    b1 = getattr(module, "gate_up_proj_bias", None) if module.has_bias else None
    b2 = getattr(module, "down_proj_bias", None) if module.has_bias else None
    experts = QuantizedGroupedExperts(
        stacks[0], stacks[1], activation=act, gate_up_bias=b1, down_bias=b2,
        layout="in_out" if module.is_transposed else "out_in", compute_dtype=x.dtype,
        dequant_chunk_bytes=getattr(module, CHUNK_ATTR, DEFAULT_CHUNK_BYTES))
    # topk indices of the model's router: in range, no range check (as the unquantized path)
    return experts(x, top_k_index, top_k_weights, lora=lora, check_ids=False)


@dataclass
class QuantizeReport:
    """What :func:`quantize_experts` did: modules converted, skipped (why), bytes saved."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"groupmoe: quantized {len(self.quantized)} experts module(s) to NF4, "
                 f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _quantize_stack(w: torch.Tensor, blocksize: int, nested: bool,
                    chunk_elems: int = 1 << 26) -> NF4Tensor:
    """Quantize ``[E, ., .]`` expert by expert in chunks (exact: each expert fills whole bytes
    and blocks), so the fp32 temporaries stay small; nest the scales once at the end."""
    e, per = w.shape[0], w[0].numel()
    if per % (2 * blocksize) or e == 1:
        t = quantize_nf4(w, blocksize)
    else:
        step = max(1, chunk_elems // per)
        parts = [quantize_nf4(w[i:i + step], blocksize) for i in range(0, e, step)]
        t = NF4Tensor(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]),
                      w.shape, w.dtype, blocksize)
    return nest_absmax(t) if nested else t


def _experts_modules(model: nn.Module):
    from .transformers import _is_v5_experts

    for name, module in model.named_modules():
        if _is_v5_experts(module):
            yield name, module


# where quantize_experts leaves its dequant_chunk_bytes on each experts module
CHUNK_ATTR = "groupmoe_dequant_chunk_bytes"
_UNSET = object()


def quantize_experts(model: nn.Module, blocksize: int = 64, nested: bool = False,
                     dequant_chunk_bytes=_UNSET) -> QuantizeReport:
    """Convert the stacked expert weights of a transformers 5 MoE model to NF4, in place.

    Each ``gate_up_proj``/``down_proj`` stack becomes its packed bytes (a frozen ``uint8``
    parameter, half a byte per weight) under an :class:`NF4Parametrization`; the dense stack is
    freed. The layout is bitsandbytes' (``nested=True``: its double-quantized absmax), so the
    result equals ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``. Biases,
    routers and everything else are left alone: load the model with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` for 4-bit attention,
    then call this for 4-bit experts. Run it before ``peft.get_peft_model`` and
    :func:`groupmoe.patch`; target the experts with
    ``LoraConfig(target_parameters=expert_lora_targets(model))``.

    ``dequant_chunk_bytes``: how groupmoe's forward and backward dequantize these stacks (see
    :class:`~groupmoe.quant.QuantizedGroupedExperts`): at most that many bytes of one stack at
    a time (one host sync per call), or ``None`` for whole stacks, transiently, without a sync
    (faster at fine-tuning token counts); unset: 256 MiB. Also set on already-4-bit modules.

    Works on patched or unpatched models; already-quantized stacks are skipped. Returns a
    :class:`QuantizeReport`. The model's own forward still runs (it dequantizes on access).
    """
    from ..ops.checks import check

    check(blocksize in (64, 128, 256, 512, 1024, 2048, 4096),
          f"quantize_experts: blocksize must be a power of two in [64, 4096], got {blocksize}")
    check(dequant_chunk_bytes is _UNSET or dequant_chunk_bytes is None
          or (isinstance(dequant_chunk_bytes, int) and dequant_chunk_bytes >= 1),
          f"quantize_experts: dequant_chunk_bytes must be None or an int >= 1, got "
          f"{dequant_chunk_bytes!r}")
    report = QuantizeReport()
    for name, module in _experts_modules(model):
        if dequant_chunk_bytes is not _UNSET:
            setattr(module, CHUNK_ATTR, dequant_chunk_bytes)
        state = quantized_stacks(module)
        if state is not None:
            report.skipped[name] = "already 4-bit" if not isinstance(state, str) else state
            continue
        if not all(isinstance(w := getattr(module, s, None), nn.Parameter) and w.dim() == 3
                   and w.is_floating_point() for s in STACKS):
            report.skipped[name] = "no floating-point 3-D gate_up_proj/down_proj parameters"
            continue
        if nn.utils.parametrize.is_parametrized(module):
            report.skipped[name] = "parametrized (e.g. inside a peft forward)"
            continue
        for s in STACKS:
            w = getattr(module, s)
            report.bytes_before += w.numel() * w.element_size()
            t = _quantize_stack(w.detach(), blocksize, nested)
            report.bytes_after += t.nbytes()
            # the packed bytes replace the dense parameter, which is then freed
            setattr(module, s, nn.Parameter(t.packed, requires_grad=False))
            nn.utils.parametrize.register_parametrization(module, s, NF4Parametrization(t),
                                                          unsafe=True)
            del w
        report.quantized.append(name)
    return report


def expert_lora_targets(model: nn.Module, names: tuple[str, ...] = STACKS) -> list[str]:
    """Full parameter paths of every experts module's stacks, for
    ``peft.LoraConfig(target_parameters=...)``. peft matches parametrized (4-bit) stacks only by
    their full path, so suffixes like ``"mlp.experts.gate_up_proj"`` miss them."""
    return [f"{name}.{s}" for name, _ in _experts_modules(model) for s in names]
