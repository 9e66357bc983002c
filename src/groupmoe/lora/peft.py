"""Read peft's LoRA adapters on stacked expert parameters (``LoraConfig(target_parameters=...)``,
peft's ``ParamWrapper``) as :class:`ExpertLoRA`, so the grouped path can run them split.

peft stores an adapter on a ``[E, d1, d2]`` parameter as ``lora_A.weight [E*r, in]`` and
``lora_B.weight [out, r*E]`` (``in``/``out`` already swapped by peft for ``[E, out, in]``
stacks), i.e. ``A_e = lora_A.weight.view(E, r, in)[e]^T`` and
``B_e = lora_B.weight.view(out, r, E)[..., e]^T``. peft ``lora.Linear`` adapters on per-expert
Linears (transformers 4.x ``ModuleList`` experts) are stacked across experts by
:func:`lora_factors_from_linears`. Only peft's attributes are read (peft is not imported).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check
from .factors import ExpertLoRA, LoRAFactors


def _is_param_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "ParamWrapper" and hasattr(module, "parameter_name")


def unwrap_param_wrappers(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Follow peft's (possibly nested) ``ParamWrapper`` chain down to the experts module.

    Returns ``(base_module, {parameter_name: wrapper})``; a module that is not a wrapper gives
    ``(module, {})``.
    """
    wrappers: dict[str, nn.Module] = {}
    while _is_param_wrapper(module):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def lora_factors_from_wrapper(wrapper: nn.Module) -> LoRAFactors | None:
    """The active adapters of one ``ParamWrapper`` in ``[E, in, out]`` layout, or ``None`` when
    adapters are disabled, merged into the base weight, or none is active here.

    Several active adapters are concatenated along the rank with their scales folded into
    ``b`` (exact: ``sum_i s_i A_i B_i = [A_1 .. A_n] [s_1 B_1; ..; s_n B_n]``).
    """
    if getattr(wrapper, "disable_adapters", False) or getattr(wrapper, "merged", False):
        return None
    names = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not names:
        return None
    e = wrapper.num_experts
    parts = []
    for name in names:
        drop = wrapper.lora_dropout[name] if name in wrapper.lora_dropout else nn.Identity()
        check(isinstance(drop, nn.Identity) or (getattr(drop, "p", 0.0) == 0.0),
              f"peft adapter {name!r} on {wrapper.parameter_name}: lora_dropout must be 0")
        wa, wb = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        check(wrapper.lora_B[name].bias is None,
              f"peft adapter {name!r} on {wrapper.parameter_name}: lora_bias is not supported")
        a = wa.reshape(e, -1, wa.shape[-1]).transpose(1, 2)  # [E, in, r]
        b = wb.reshape(wb.shape[0], -1, e).permute(2, 1, 0)  # [E, r, out]
        parts.append((a, b, float(wrapper.scaling[name])))
    if len(parts) == 1:
        return LoRAFactors(*parts[0])
    a = torch.cat([p[0] for p in parts], dim=2)
    b = torch.cat([p[1] * p[2] for p in parts], dim=1)
    return LoRAFactors(a, b, 1.0)


def lora_from_peft_param_wrapper(module: nn.Module, gate_up_name: str = "gate_up_proj",
                                 down_name: str = "down_proj") -> ExpertLoRA | None:
    """``ExpertLoRA`` of an experts module wrapped by peft's ``ParamWrapper`` (``None`` when no
    adapter is active). Factors are views of peft's parameters: gradients reach them.

    Use :func:`unwrap_param_wrappers` to get the base experts module (its stacked weights).
    """
    _, wrappers = unwrap_param_wrappers(module)
    unknown = set(wrappers) - {gate_up_name, down_name}
    check(not unknown, f"lora_from_peft_param_wrapper: adapters on unsupported parameters "
          f"{sorted(unknown)} (grouped LoRA covers {gate_up_name!r} and {down_name!r})")
    gate_up = lora_factors_from_wrapper(wrappers[gate_up_name]) \
        if gate_up_name in wrappers else None
    down = lora_factors_from_wrapper(wrappers[down_name]) if down_name in wrappers else None
    if gate_up is None and down is None:
        return None
    return ExpertLoRA(gate_up=gate_up, down=down)


def _active_linear_adapter(lin: nn.Module, runtime: bool) -> tuple[str | None, str | None]:
    """``(adapter, None)`` for the one vanilla LoRA adapter a peft ``lora.Linear`` applies now,
    ``(None, None)`` when it applies none (disabled, or no active adapter here), or
    ``(None, why)`` when its computation is not ``x W^T + scale * B(A(x))``. ``runtime`` adds
    the check that depends on the mode: dropout with ``p > 0`` while training."""
    if not all(hasattr(lin, a) for a in ("lora_A", "lora_B", "scaling", "active_adapters")):
        return None, f"adapter of type {type(lin).__name__} that is not a peft LoRA Linear"
    if getattr(lin, "merged", False):
        return None, "LoRA merged into the base weight"
    if getattr(lin, "disable_adapters", False):
        return None, None
    names = [a for a in lin.active_adapters if a in lin.lora_A]
    if len(names) != 1:
        return None, None if not names else f"{len(names)} active LoRA adapters"
    name = names[0]
    if name in getattr(lin, "lora_variant", {}) or getattr(lin, "use_dora", {}).get(name):
        return None, f"LoRA variant (e.g. DoRA) on adapter {name!r}"
    if lin.lora_A[name].bias is not None or lin.lora_B[name].bias is not None:
        return None, f"LoRA with a bias on adapter {name!r}"
    drop = lin.lora_dropout[name] if name in getattr(lin, "lora_dropout", {}) else None
    if runtime and drop is not None and drop.training and getattr(drop, "p", 0.0) > 0:
        return None, "lora_dropout > 0 in training"
    return name, None


def lora_factors_from_linears(lins: list[nn.Module], runtime: bool = True
                              ) -> LoRAFactors | str | None:
    """Stack the peft LoRA adapters of one projection across experts (one ``nn.Linear`` or peft
    ``lora.Linear`` per expert) as :class:`LoRAFactors` ``a [E, in, r]``, ``b [E, r, out]``.

    ``torch.stack`` keeps each expert's ``lora_A``/``lora_B`` weight in the graph, so their
    gradients reach peft's parameters. Returns ``None`` when no expert applies an adapter, or a
    reason (str) when the adapters are not a single unmerged vanilla LoRA of one rank on every
    expert (see :func:`_active_linear_adapter`; ``runtime=False`` skips the mode check).
    """
    found = []
    for idx, lin in enumerate(lins):
        if not hasattr(lin, "lora_A") and not hasattr(lin, "base_layer"):
            found.append(None)
            continue
        name, why = _active_linear_adapter(lin, runtime)
        if why is not None:
            return f"expert {idx}: {why}"
        found.append(name)
    if all(n is None for n in found):
        return None
    if any(n is None for n in found):
        return "LoRA on some experts only"
    a = [lin.lora_A[n].weight for lin, n in zip(lins, found)]  # [r, in]
    b = [lin.lora_B[n].weight for lin, n in zip(lins, found)]  # [out, r]
    if len({w.shape for w in a}) != 1 or len({w.shape for w in b}) != 1:
        return "LoRA ranks differ across experts"
    scales = [float(lin.scaling[n]) for lin, n in zip(lins, found)]
    a_st = torch.stack([w.t() for w in a])
    if len(set(scales)) == 1:
        return LoRAFactors(a_st, torch.stack([w.t() for w in b]), scales[0])
    return LoRAFactors(a_st, torch.stack([w.t() * s for w, s in zip(b, scales)]), 1.0)
