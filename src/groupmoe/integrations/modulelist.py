"""transformers 4.x MoE blocks whose experts are an ``nn.ModuleList`` of MLPs (seed 003).

The block's forward is replaced by: router (the model's exact rule: softmax in fp32, top-k,
renormalise as the model does, Mixtral's training jitter, weights cast to the activations'
dtype) -> groupmoe's grouped expert MLP on stacks of the experts' weights -> the model's
shared expert, returning what the model returned (``(hidden, router_logits)`` or ``hidden``).
peft LoRA on the experts' Linears (``LoraConfig(target_modules=["gate_proj", ...])``) runs
grouped too: each projection's per-expert ``lora_A``/``lora_B`` are stacked the same way and
applied by :func:`groupmoe.lora.expert_mlp_lora`, gate and up side by side.

The experts' ``nn.Linear`` weights go to the ops as lists (:mod:`groupmoe.ops.stacks`): stacked
inside the op on every call (gradients reach each expert's weight) and never kept stacked for
backward, which stacks them again; under torch.compile too.
Experts that are bitsandbytes ``Linear4bit`` (QLoRA) run as cached NF4 stacks on the chunked
dequantize path instead (:mod:`groupmoe.integrations.modulelist_4bit`).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.experts import expert_mlp_lora
from ..lora.factors import ExpertLoRA, concat_outputs
from ..lora.peft import lora_factors_from_linears
from ..ops.activations import SwiGLU
from ..ops.experts import expert_mlp
from ..ops.routing import build_routing
from ..quant.experts import QuantizedGroupedExperts
from . import modulelist_4bit as q4

log = logging.getLogger("groupmoe")

# block class -> names of the gate, up and down projections inside each expert
BLOCKS: dict[str, tuple[str, str, str]] = {
    "Qwen3MoeSparseMoeBlock": ("gate_proj", "up_proj", "down_proj"),
    "Qwen2MoeSparseMoeBlock": ("gate_proj", "up_proj", "down_proj"),
    "OlmoeSparseMoeBlock": ("gate_proj", "up_proj", "down_proj"),
    "MixtralSparseMoeBlock": ("w1", "w3", "w2"),
}
_ORIGINAL = "_groupmoe_original_forward"
_warned: set[tuple[str, str]] = set()


def _projections(block: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    names = BLOCKS[type(block).__name__]
    return [tuple(getattr(e, n, None) for n in names) for e in block.experts]


def _base(lin: nn.Module | None) -> nn.Module | None:
    """The expert's own Linear under peft's adapter layers."""
    while lin is not None and hasattr(lin, "base_layer"):
        lin = lin.base_layer
    return lin


def _lora(block: nn.Module, runtime: bool) -> ExpertLoRA | str | None:
    """The experts' peft LoRA as stacked factors (gate and up side by side), ``None`` without
    adapters, or why it cannot run grouped."""
    projs = _projections(block)
    names = BLOCKS[type(block).__name__]
    factors = []
    for i, name in enumerate(names):
        f = lora_factors_from_linears([p[i] for p in projs], runtime)
        if isinstance(f, str):
            return f"LoRA on {name}: {f}"
        factors.append(f)
    gate, up, down = factors
    if gate is None and up is None and down is None:
        return None
    inter = _base(projs[0][0]).out_features
    return ExpertLoRA(gate_up=concat_outputs([(gate, inter), (up, inter)]), down=down)


def _base_lins(block: nn.Module) -> list[list[nn.Module]]:
    """The experts' base Linears per projection: ``[gates, ups, downs]``."""
    return [list(map(_base, proj)) for proj in zip(*_projections(block))]


def _is_4bit(block: nn.Module) -> bool:
    return q4.is_4bit(_base(_projections(block)[0][0]))


def _static_reason(block: nn.Module) -> str | None:
    if not isinstance(getattr(block, "gate", None), nn.Linear):
        return "router is not a plain nn.Linear"
    for idx, projs in enumerate(_projections(block)):
        for lin in map(_base, projs):
            if lin is None or not isinstance(getattr(lin, "weight", None), torch.Tensor):
                return f"expert {idx} lacks a projection"
    lins = _base_lins(block)
    if any(q4.is_4bit(lin) for proj in lins for lin in proj):
        why = q4.reason_4bit(lins)
        if why is not None:
            return why
    else:
        probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
        for idx, projs in enumerate(_projections(block)):
            for lin in map(_base, projs):
                if not lin.weight.is_floating_point() or getattr(lin, "bias", None) is not None:
                    return f"expert {idx} has quantized or biased weights"
            act = getattr(block.experts[idx], "act_fn", None)
            if act is None or not torch.allclose(act(probe), F.silu(probe)):
                return f"expert {idx} activation is not SiLU"
    lora = _lora(block, runtime=False)
    return lora if isinstance(lora, str) else None


def _runtime_reason(lins: list[list[nn.Module]], x: torch.Tensor) -> str | None:
    """Why this call cannot run grouped, given the experts' base Linears (:func:`_base_lins`)."""
    if q4.is_4bit(lins[0][0]):
        return q4.runtime_reason_4bit(lins, x)
    for idx, projs in enumerate(zip(*lins)):
        for lin in projs:
            w = lin.weight
            if w.dtype != x.dtype or w.device != x.device:
                return f"expert {idx} weights {w.dtype} on {w.device}, input {x.dtype} on " \
                       f"{x.device}"
    if x.is_cuda and x.dtype == torch.float32:
        return "fp32 on CUDA (grouped GEMM kernels are bf16/fp16)"
    return None


def _returns_router_logits(block: nn.Module) -> bool:
    """Whether the model's own forward returns ``(hidden, router_logits)`` (the contract
    changed across 4.x releases for some models): probed once with a one-token input, in
    eval mode so no jitter draws from the RNG."""
    w = block.gate.weight
    dtype = w.quant_state.dtype if q4.is_4bit(block.gate) else w.dtype
    # with autograd on: bitsandbytes repacks 4-bit weights for its CPU kernel in a no-grad eval
    # call, a layout groupmoe does not read
    probe = torch.zeros(1, 1, block.gate.in_features, dtype=dtype, device=w.device,
                        requires_grad=True)
    was_training = block.training
    block.eval()
    try:
        with torch.enable_grad():
            return isinstance(block.forward(probe), tuple)
    finally:
        block.train(was_training)


def _weight_pieces(lins: list[list[nn.Module]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The experts' weights as the ops' per-expert lists: ``[gate_0, up_0, gate_1, ...]`` and
    ``[down_0, down_1, ...]`` (``nn.Linear`` layout)."""
    gates, ups, downs = lins
    gate_up = [w for g, u in zip(gates, ups) for w in (g.weight, u.weight)]
    return gate_up, [d.weight for d in downs]


def grouped_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Replacement forward of a ModuleList MoE block (see module docstring)."""
    lora = _lora(self, runtime=True)
    lins = _base_lins(self)
    reason = lora if isinstance(lora, str) else _runtime_reason(lins, hidden_states)
    if reason is not None:
        key = (type(self).__name__, reason)
        if key not in _warned:
            _warned.add(key)
            log.warning("groupmoe: %s runs its original forward: %s", key[0], reason)
        return getattr(self, _ORIGINAL)(hidden_states)
    shape = hidden_states.shape
    jitter = getattr(self, "jitter_noise", 0.0)
    if self.training and jitter > 0:  # Mixtral: jittered input feeds router and experts
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - jitter, 1.0 + jitter)
    x = hidden_states.reshape(-1, shape[-1])
    router_logits = self.gate(x)
    weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, ids = torch.topk(weights, self.top_k, dim=-1)
    if type(self).__name__ == "MixtralSparseMoeBlock" or getattr(self, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    # ids are topk over the router's scores: in range, so the experts skip the range check
    # and its device sync per layer
    if q4.is_4bit(lins[0][0]):
        gate_up, down = q4.nf4_stacks(self, lins)
        experts = QuantizedGroupedExperts(gate_up, down, SwiGLU(), compute_dtype=x.dtype)
        out = experts(x, ids, weights, lora=lora, check_ids=False)
    else:
        out = _dense_experts(lins, x, ids, weights, lora)
    if getattr(self, "shared_expert", None) is not None:
        shared = self.shared_expert(x)
        if getattr(self, "shared_expert_gate", None) is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        out = out + shared
    out = out.reshape(shape)
    return (out, router_logits) if self._groupmoe_returns_logits else out


def _dense_experts(lins: list[list[nn.Module]], x: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor, lora: ExpertLoRA | None) -> torch.Tensor:
    """The routed experts on the experts' float weights (stacked inside the ops)."""
    w1, w2 = _weight_pieces(lins)
    routing = build_routing(ids, len(w2), check_ids=False)
    if lora is None:
        return expert_mlp(x, routing, weights, w1, w2, activation=SwiGLU())
    return expert_mlp_lora(x, routing, weights, w1, w2, lora, activation=SwiGLU())


def patch_modulelist_blocks(model: nn.Module, report) -> None:
    """Replace the forward of every eligible 4.x ModuleList MoE block; record in ``report``."""
    for name, block in model.named_modules():
        if type(block).__name__ not in BLOCKS or hasattr(block, _ORIGINAL) or \
                not isinstance(getattr(block, "experts", None), nn.ModuleList):
            continue  # transformers 5 blocks of the same name hold stacked experts
        reason = _static_reason(block)
        if reason is not None:
            report.skipped[name] = reason
            continue
        setattr(block, _ORIGINAL, block.forward)
        block._groupmoe_returns_logits = _returns_router_logits(block)
        block.forward = types.MethodType(grouped_block_forward, block)
        report.patched.append(name)
        if _is_4bit(block):
            report.quantized[name] = q4.describe(_base_lins(block))


def unpatch_modulelist_blocks(model: nn.Module) -> None:
    """Restore the original forwards (only those groupmoe replaced)."""
    for block in model.modules():
        if hasattr(block, _ORIGINAL) and getattr(block.forward, "__func__", None) \
                is grouped_block_forward:
            block.forward = getattr(block, _ORIGINAL)
            del block.__dict__["forward"]
            delattr(block, _ORIGINAL)
            delattr(block, "_groupmoe_returns_logits")
            q4.drop_cache(block)
