"""Read peft's LoRA adapters on stacked expert parameters (``LoraConfig(target_parameters=...)``,
peft's ``ParamWrapper``) as :class:`ExpertLoRA`, so the grouped path can run them split.

peft stores an adapter on a ``[E, d1, d2]`` parameter as ``lora_A.weight [E*r, in]`` and
``lora_B.weight [out, r*E]`` (``in``/``out`` already swapped by peft for ``[E, out, in]``
stacks), i.e. ``A_e = lora_A.weight.view(E, r, in)[e]^T`` and
``B_e = lora_B.weight.view(out, r, E)[..., e]^T``. Only peft's attributes are read (peft is not
imported).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check
from .experts import ExpertLoRA, LoRAFactors


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
