"""Build the model to fine-tune: weights (loaded or random, on the GPU directly), 4-bit where
asked, peft LoRA on the chosen targets, and the experts implementation."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check
from .configs import ModelSpec

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ("attention", "experts")


def _bnb():
    try:
        import bitsandbytes
    except Exception:  # its import raises more than ImportError without a usable binary
        return None
    return bitsandbytes


def experts_modules(model: nn.Module) -> list[str]:
    """Names of the model's MoE experts modules (transformers 5 stacks or 4.x ModuleLists)."""
    from ..integrations.modulelist import BLOCKS
    from ..integrations.transformers import _is_v5_experts

    return [n for n, m in model.named_modules()
            if _is_v5_experts(m) or (type(m).__name__ in BLOCKS
                                     and isinstance(getattr(m, "experts", None), nn.ModuleList))]


def load(spec: ModelSpec, device: torch.device, dtype: torch.dtype, attention_4bit: bool,
         attention: str | None = None):
    """The causal LM of ``spec`` on ``device``: its weights, or random ones initialised on the
    device itself. ``attention_4bit`` loads attention through bitsandbytes (weights) or
    quantizes it after the random initialisation; ``attention`` picks transformers' attention
    implementation (``None``: the model's default)."""
    import transformers

    kw = {} if attention is None else {"attn_implementation": attention}
    if spec.weights is not None:
        if attention_4bit:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec.weights, dtype=dtype, device_map={"": device}, local_files_only=True, **kw)
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(spec.config, dtype=dtype, **kw)
        if attention_4bit:
            _attention_to_4bit(model, device)
    check(bool(experts_modules(model)), f"{spec.name} has no MoE layers (no experts modules): "
          "groupmoe finetune is for mixture-of-experts models")
    return model


def _attention_to_4bit(model: nn.Module, device: torch.device) -> None:
    """bitsandbytes NF4 ``Linear4bit`` in place of the attention projections (what
    ``BitsAndBytesConfig(load_in_4bit=True)`` does when loading weights)."""
    bnb = _bnb()
    for parent in list(model.modules()):
        for name in ATTENTION:
            lin = getattr(parent, name, None)
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=lin.weight.dtype, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(parent, name, q.to(device))


def attention_4bit_reason(device: torch.device) -> str | None:
    """Why attention stays in the compute dtype under ``--qlora`` (``None``: it goes 4-bit)."""
    if device.type != "cuda":
        return "attention kept in the compute dtype: bitsandbytes 4-bit needs CUDA here"
    if _bnb() is None:
        return "attention kept in the compute dtype: bitsandbytes is not installed"
    return None


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...], alpha: float | None):
    """peft LoRA of ``rank`` on the attention projections and/or the expert stacks."""
    from peft import LoraConfig, get_peft_model

    from ..integrations import expert_lora_targets

    check(rank >= 1, f"--lora-rank must be >= 1, got {rank}")
    check(len(targets) > 0 and set(targets) <= set(TARGETS),
          f"--lora-targets must be among {TARGETS}, got {targets}")
    kw = {}
    if "attention" in targets:
        kw["target_modules"] = list(ATTENTION)
    if "experts" in targets:
        stacks = expert_lora_targets(model)
        check(bool(stacks), "--lora-targets experts: the model has no stacked experts "
              "(transformers 5) to target")
        kw["target_parameters"] = stacks
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        lora_dropout=0.0, **kw)
    return get_peft_model(model, config)


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer (``nn.Module.compile``, as torchtitan compiles per
    block): one graph per layer type, reused by every layer, and gradient checkpointing still
    wraps each layer call. Returns the number of layers compiled."""
    layers = [m for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.endswith("layers")]
    check(len(layers) == 1, "--compile: cannot find the model's one list of decoder layers")
    for layer in layers[0]:
        layer.compile()
    return len(layers[0])
