"""Accelerate Hugging Face transformers MoE models with groupmoe, keeping their semantics.

transformers 5 keeps experts as stacked parameters in classes decorated with
``use_experts_implementation``, dispatching on ``config._experts_implementation`` through
``ALL_EXPERTS_FUNCTIONS``. :func:`register` adds ``"groupmoe"`` there (so
``from_pretrained(..., experts_implementation="groupmoe")`` works) and :func:`patch` switches a
loaded model to it. Only the experts computation changes: routers, shared experts, dtype casts
and return values stay the model's own. transformers 4 keeps experts as ``nn.ModuleList``
blocks; :mod:`groupmoe.integrations.modulelist` patches those.

Each call checks eligibility again (device, dtype, quantized or LoRA-wrapped weights) and runs
the model's original forward, with a one-time warning that says why, where groupmoe cannot.
4-bit (NF4) expert stacks run grouped too: see :mod:`groupmoe.integrations.quantized`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.activations import Activation
from ..ops.backend import FUSED_ACTIVATIONS
from ..ops.checks import check
from ..ops.experts import PRECISIONS, Precision, expert_mlp
from ..ops.grouped_linear import grouped_linear
from ..ops.routing import build_routing, combine
from .activations import own_activation, recognise
from .quantized import (
    describe,
    quantized_forward,
    quantized_stacks,
    share_parametrized_class,
)

log = logging.getLogger("groupmoe")
IMPL_NAME = "groupmoe"
_PREVIOUS = "_groupmoe_previous_impl"
_PRECISION = "_groupmoe_precision"  # patch(precision=...) per experts module
_warned: set[tuple[str, str]] = set()


@dataclass
class PatchReport:
    """What :func:`patch` did: module paths patched, and those skipped with the reason."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    quantized: dict[str, str] = field(default_factory=dict)  # patched modules with 4-bit stacks
    paths: dict[str, str] = field(default_factory=dict)  # patched module -> the path it runs
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"groupmoe: patched {len(self.patched)} experts module(s)"]
        counts: dict[str, int] = {}
        for path in self.paths.values():
            counts[path] = counts.get(path, 0) + 1
        lines += [f"  {n} on the {path}" for path, n in counts.items()]
        if self.quantized:
            kinds = sorted(set(self.quantized.values()))
            lines.append(f"  {len(self.quantized)} with 4-bit experts: {', '.join(kinds)}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _is_v5_experts(module: nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    return (hasattr(fwd, "__wrapped__") and hasattr(module, "has_gate")
            and hasattr(module, "num_experts") and hasattr(module, "config"))


def _original_forward(module: nn.Module):
    return type(module).forward.__wrapped__


def _raw(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter without peft's parametrization (its ``original``)."""
    if nn.utils.parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name, None)


@dataclass(frozen=True)
class Generic:
    """The generic grouped path: groupmoe's routing and grouped GEMMs around the model's own
    activation (and post-expert norm) under autograd, for ``why`` the fused op cannot run."""

    why: str


def _first_stack(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _activation(module: nn.Module) -> Activation | Generic:
    """The fused op's activation for ``module`` (proven equal to the module's own), or the
    generic path and why."""
    if getattr(module, "has_post_expert_norm", False):
        return Generic("post-expert norm")
    act = recognise(module)
    if act is not None:
        return act
    own = own_activation(module)
    what = (f"{type(module).__name__}._apply_gate" if module.has_gate
            else f"activation {type(own).__name__}")
    return Generic(f"{what} is none of groupmoe's activation forms")


def path_name(act: Activation | Generic) -> str:
    """How the patch report names the path a module runs."""
    if isinstance(act, Generic):
        return f"generic grouped path ({act.why})"
    return f"fused expert op ({act.name if act.name in FUSED_ACTIVATIONS else act.spec})"


def _static_reason(module: nn.Module) -> str | None:
    if getattr(module, "_is_expert_parallel", False):
        return "transformers' own expert parallelism"
    w = _raw(module, _first_stack(module))
    if w is None or _raw(module, "down_proj") is None:
        return f"no {_first_stack(module)}/down_proj stacks"
    q = quantized_stacks(module)
    if isinstance(q, str):
        return q
    if q is None and not w.is_floating_point():
        return f"quantized weights ({w.dtype})"
    if q is not None and not module.has_gate:
        return "4-bit experts without a gate projection"
    return None


def _runtime_reason(module: nn.Module, x: torch.Tensor,
                    stacks: tuple | str | None) -> str | None:
    if isinstance(stacks, str):
        return stacks
    if stacks is not None:
        return _quantized_runtime_reason(stacks[0], x)
    w = _raw(module, _first_stack(module))
    if not w.is_floating_point() or w.dtype != x.dtype:
        return f"hidden states {x.dtype} vs expert weights {w.dtype}"
    if w.device != x.device:
        return f"hidden states on {x.device}, experts on {w.device}"
    if x.is_cuda and x.dtype == torch.float32:
        return "fp32 on CUDA (grouped GEMM kernels are bf16/fp16)"
    if nn.utils.parametrize.is_parametrized(module) and _peft_wrapper(module) is None:
        return "parametrized expert weights without a readable peft adapter"
    return None


def _quantized_runtime_reason(w, x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"hidden states {x.dtype} (4-bit experts compute in bf16/fp16/fp32)"
    if w.device != x.device:
        return f"hidden states on {x.device}, experts on {w.device}"
    if x.is_cuda and x.dtype == torch.float32:
        return "fp32 on CUDA (grouped GEMM kernels are bf16/fp16)"
    return None


def _peft_wrapper(module: nn.Module):
    ref = getattr(module, "_groupmoe_peft_wrapper", None)
    return ref() if ref is not None else None


def _warn_once(module: nn.Module, reason: str) -> None:
    key = (type(module).__name__, reason)
    if key not in _warned:
        _warned.add(key)
        log.warning("groupmoe: %s runs its original forward: %s", type(module).__name__, reason)


def _weights(module: nn.Module, name: str) -> torch.Tensor:
    """A stack in groupmoe's ``[E, in, out]`` layout (a view: gradients reach the parameter)."""
    w = _raw(module, name)
    return w if module.is_transposed else w.transpose(-1, -2)


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ALL_EXPERTS_FUNCTIONS["groupmoe"]``: the model's experts computation, grouped."""
    ep = getattr(module, "groupmoe_ep", None)
    if ep is not None:  # stacks sharded across ranks (groupmoe.parallel.shard_experts)
        return ep(hidden_states, top_k_index, top_k_weights, check_ids=False)
    act = getattr(module, "_groupmoe_act", None)
    reason = None
    if act is None:  # selected through the config without groupmoe.patch
        reason = _static_reason(module)
        act = None if reason else _prepare(module)
    stacks = quantized_stacks(module)
    reason = reason or _runtime_reason(module, hidden_states, stacks)
    wrapper = _peft_wrapper(module)
    if reason is None and isinstance(act, Generic) and (stacks is not None or wrapper):
        reason = f"{act.why}, with 4-bit or peft-wrapped stacks"
    if stacks is not None and wrapper is not None:
        _check_peft_on_4bit(module, wrapper, reason)
    if reason is not None:
        if stacks is not None and any(type(getattr(module, n)).__name__ == "Params4bit"
                                      for n in ("gate_up_proj", "down_proj")):
            raise ValueError(f"groupmoe: {type(module).__name__} holds bitsandbytes Params4bit "
                             f"expert stacks, which its own forward cannot run, and groupmoe "
                             f"cannot run them here: {reason}")
        _warn_once(module, reason)
        return _original_forward(module)(module, hidden_states, top_k_index, top_k_weights)
    if stacks is not None:
        lora = None
        if wrapper is not None:
            from ..lora.peft import lora_from_peft_param_wrapper

            lora = lora_from_peft_param_wrapper(wrapper)
        return quantized_forward(module, stacks, act, hidden_states, top_k_index,
                                 top_k_weights, lora)
    # the model's router takes top_k_index from topk over num_experts scores: in range by
    # construction, so the range check's device sync is skipped
    routing = build_routing(top_k_index, module.num_experts, check_ids=False)
    first = _first_stack(module)
    w1, w2 = _weights(module, first), _weights(module, "down_proj")
    b1 = _raw(module, f"{first}_bias") if module.has_bias else None
    b2 = _raw(module, "down_proj_bias") if module.has_bias else None
    if isinstance(act, Generic):
        return _generic_forward(module, hidden_states, routing, top_k_weights, w1, w2, b1, b2)
    if wrapper is not None:  # peft's adapters on the stacks, read off its ParamWrapper
        from ..lora.experts import expert_mlp_lora
        from ..lora.peft import lora_from_peft_param_wrapper

        lora = lora_from_peft_param_wrapper(wrapper)
        if lora is not None:
            return expert_mlp_lora(hidden_states, routing, top_k_weights, w1, w2, lora, b1, b2,
                                   act)
    return expert_mlp(hidden_states, routing, top_k_weights, w1, w2, b1, b2, act,
                      precision=module.__dict__.get(_PRECISION, "default"))


def _generic_forward(module: nn.Module, x: torch.Tensor, routing, top_k_weights: torch.Tensor,
                     w1, w2, b1, b2) -> torch.Tensor:
    """groupmoe's routing, gathers and grouped GEMMs around the module's own activation (and
    post-expert norm), all under autograd: grouped, not memory-lean."""
    offs, idx = routing.offsets, routing.expert_index
    h = grouped_linear(x.index_select(0, routing.token_index), w1, offs, b1, idx)
    y = grouped_linear(own_activation(module)(h), w2, offs, b2, idx)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return combine(y, routing, top_k_weights).to(x.dtype)


def _check_peft_on_4bit(module: nn.Module, wrapper: nn.Module, reason: str | None) -> None:
    """peft cannot apply LoRA to (or merge it into) a 4-bit stack itself, so LoRA on 4-bit
    experts has no fallback: fail clearly instead of silently running without the adapters."""
    from ..lora.peft import lora_from_peft_param_wrapper, unwrap_param_wrappers

    _, wrappers = unwrap_param_wrappers(wrapper)
    if any(getattr(w, "merged", False) for w in wrappers.values()):
        raise ValueError(f"groupmoe: LoRA merged into the 4-bit experts of "
                         f"{type(module).__name__}: a 4-bit stack cannot hold a merged adapter "
                         f"(peft's merge leaves it unchanged); unmerge the adapter")
    if reason is not None and lora_from_peft_param_wrapper(wrapper) is not None:
        raise ValueError(f"groupmoe: {type(module).__name__} has peft LoRA on 4-bit experts but "
                         f"cannot run them ({reason}), and peft cannot apply LoRA to 4-bit "
                         f"stacks itself")


def _prepare(module: nn.Module) -> Activation | Generic:
    module._groupmoe_act = _activation(module)
    return module._groupmoe_act


def register() -> None:
    """Add ``"groupmoe"`` to transformers' experts implementations (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, experts_forward)


def _link_peft_wrappers(model: nn.Module) -> None:
    from ..lora.peft import unwrap_param_wrappers

    for module in model.modules():  # parents come first: link the outermost wrapper
        if type(module).__name__ == "ParamWrapper":
            base, _ = unwrap_param_wrappers(module)
            if _peft_wrapper(base) is None:
                base._groupmoe_peft_wrapper = weakref.ref(module)
                module.forward = _peft_wrapper_forward(module)


def _peft_wrapper_forward(wrapper: nn.Module):
    """A forward for peft's outermost ``ParamWrapper`` over experts that groupmoe runs: it calls
    the experts module directly, which reads the adapters off the wrapper, instead of peft's
    parametrization of the stack (``W + BA`` set on the parameter per call, which torch.compile
    cannot trace and peft cannot apply to a 4-bit stack). Where groupmoe falls back to the
    model's forward, dense stacks take peft's own path (4-bit ones fail clearly there)."""
    from ..lora.peft import unwrap_param_wrappers

    def forward(x, *args, **kwargs):
        base, _ = unwrap_param_wrappers(wrapper)
        if base.config._experts_implementation == IMPL_NAME and (
                quantized_stacks(base) is not None or _runs_grouped(base, x)):
            return base(x, *args, **kwargs)
        return type(wrapper).forward(wrapper, x, *args, **kwargs)

    return forward


def _runs_grouped(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`experts_forward` runs a patched ``module`` on ``x`` grouped (its static
    checks passed at :func:`patch`, which prepared its activation)."""
    act = getattr(module, "_groupmoe_act", None)
    return isinstance(act, Activation) and _runtime_reason(module, x, None) is None


def patch(model: nn.Module, precision: Precision = "default") -> PatchReport:
    """Switch every eligible MoE experts module of ``model`` to groupmoe.

    transformers 5 models switch their experts implementation (the config's
    ``_experts_implementation``, restored by :func:`unpatch`); transformers 4 ``ModuleList``
    blocks get their forward replaced. Returns (and logs) a :class:`PatchReport`.

    ``precision="fp8"`` (experimental, see :func:`~groupmoe.ops.expert_mlp`) runs the forward
    and dX GEMMs of transformers 5 experts with plain (not 4-bit, not LoRA-wrapped) stacks in
    e4m3; the report names the modules that keep their own precision.
    """
    from .modulelist import patch_modulelist_blocks

    check(precision in PRECISIONS,
          f"groupmoe.patch: precision must be one of {PRECISIONS}, got {precision!r}")
    report = PatchReport()
    v5 = [(n, m) for n, m in model.named_modules() if _is_v5_experts(m)]
    if v5:
        register()
        _link_peft_wrappers(model)
    patched, fp8_excluded = [], []
    for name, module in v5:
        reason = _static_reason(module)
        if reason is not None:
            report.skipped[name or type(module).__name__] = reason
            continue
        quant = describe(module)
        if quant is not None:
            report.quantized[name] = quant
            share_parametrized_class(module)
        act = _prepare(module)
        report.paths[name] = path_name(act)
        module.__dict__[_PRECISION] = precision
        if precision != "default" and (quant is not None or isinstance(act, Generic)
                                       or _peft_wrapper(module) is not None):
            fp8_excluded.append(name)
        # the previous choice lives on the module, not the config (which is saved to disk)
        if _PREVIOUS not in module.__dict__:
            module.__dict__[_PREVIOUS] = module.config._experts_implementation
        patched.append(module)
        report.patched.append(name)
    for module in patched:
        module.config._experts_implementation = IMPL_NAME
    if getattr(model, "is_loaded_in_4bit", False) and len(report.quantized) < len(patched):
        report.notes.append(
            "the model is loaded in 4-bit but some experts are not: transformers' bitsandbytes "
            "integration leaves stacked experts in their dtype; groupmoe.quantize_experts(model) "
            "converts them to NF4")
    modulelist_before = len(report.patched)
    patch_modulelist_blocks(model, report)
    if precision != "default":
        fp8_excluded += report.patched[modulelist_before:]  # transformers 4 blocks
        if fp8_excluded:
            report.notes.append(
                f"precision={precision!r} applies to plain expert stacks; these keep their "
                f"own precision (4-bit, LoRA-wrapped, generic path or transformers 4 "
                f"blocks): {', '.join(fp8_excluded)}")
    log.info("%s", report)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`: restore the experts implementation and original block forwards."""
    from .modulelist import unpatch_modulelist_blocks

    for module in model.modules():
        if type(module).__name__ == "ParamWrapper" and "forward" in module.__dict__:
            del module.forward
        if _is_v5_experts(module):
            if _PREVIOUS in module.__dict__:
                module.config._experts_implementation = module.__dict__.pop(_PREVIOUS)
            for attr in ("_groupmoe_act", "_groupmoe_peft_wrapper", _PRECISION):
                if attr in module.__dict__:
                    delattr(module, attr)
    unpatch_modulelist_blocks(model)


def use_experts_implementation(model: nn.Module, impl: str, precision: Precision = "default"
                               ) -> PatchReport | None:
    """Run ``model``'s experts with ``impl``: ``"groupmoe"`` (:func:`patch` with ``precision``,
    whose report is returned) or one of transformers' own (``"eager"``, ``"grouped_mm"``,
    ``"batched_mm"``, ...; groupmoe's patch undone first)."""
    check(precision == "default" or impl == IMPL_NAME,
          f"precision={precision!r} needs the groupmoe experts implementation, not {impl!r}")
    unpatch(model)
    if impl == IMPL_NAME:
        return patch(model, precision)
    model.config._experts_implementation = impl
    return None


@contextlib.contextmanager
def patched(model: nn.Module):
    """``with groupmoe.patched(model) as report: ...`` patches inside the block only."""
    report = patch(model)
    try:
        yield report
    finally:
        unpatch(model)
