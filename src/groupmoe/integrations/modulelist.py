"""transformers 4.x MoE blocks whose experts are an ``nn.ModuleList`` of MLPs (seed 003).

For blocks that route in their forward (:data:`BLOCKS`: Qwen2/3-MoE, Qwen3-Next, Qwen3-Omni,
OLMoE, FlexOlmo, Mixtral, MiniMax, Phi-MoE, Jamba, Hunyuan, ERNIE 4.5) the forward is replaced
by: the router, run by the model's exact rule (softmax in fp32, top-k, renormalised as the
model does; Mixtral's training jitter, Phi-MoE's sparsemixer, ERNIE's biased fp32 router), the
weights cast to the activations' dtype -> groupmoe's grouped expert MLP on stacks of the
experts' weights -> the model's shared expert, returning what the model returned
(``(hidden, router_logits)`` or ``hidden``). Blocks that route themselves and hand a
``moe(hidden, topk_indices, topk_weights)`` method the result (DeepSeek-V2/V3, dots1,
GLM-4-MoE, GLM-4.1V-MoE, LongCat-Flash) keep their router; only ``moe`` is replaced. LongCat's
zero-compute identity experts add ``w * x`` outside the grouped op, their slots given to one
extra expert of zeros inside it (no data-dependent shapes; the rows cost GEMM time).
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
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.experts import expert_mlp_lora
from ..lora.factors import ExpertLoRA, LoRAFactors, concat_outputs
from ..lora.peft import lora_factors_from_linears
from ..ops.activations import SwiGLU
from ..ops.experts import expert_mlp
from ..ops.routing import build_routing
from ..quant.experts import QuantizedGroupedExperts
from . import modulelist_4bit as q4

log = logging.getLogger("groupmoe")

def _softmax_topk(renorm: str):
    """fp32 softmax, top-k, renormalised ``"always"``, per ``norm_topk_prob`` (``"flag"``) or
    ``"never"``."""

    def route(block: nn.Module, logits: torch.Tensor):
        weights, ids = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), block.top_k, -1)
        if renorm == "always" or (renorm == "flag" and getattr(block, "norm_topk_prob", False)):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    return route


def _ernie_route(block: nn.Module, logits: torch.Tensor):
    """ERNIE 4.5: experts chosen on the probabilities plus a correction bias, weighted by the
    unbiased ones, renormalised with a floor."""
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    _, ids = torch.topk(block.moe_statics(probs), block.top_k, dim=-1)
    weights = probs.gather(-1, ids)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=block.norm_min), ids


def _model_route(name: str):
    """The model's own routing function ``name(logits, jitter_eps=, training=)`` from the
    block's module (Phi-MoE's sparsemixer: masked sequential top-1, sampled in training)."""

    def route(block: nn.Module, logits: torch.Tensor):
        fn = getattr(sys.modules[type(block).__module__], name)
        return fn(logits, jitter_eps=block.router_jitter_noise, training=block.training)

    return route


@dataclass(frozen=True)
class BlockKind:
    """How a 4.x ModuleList MoE block names its experts' projections and routes.

    ``projections``: the gate, up and down Linears inside each expert. Blocks that route in
    their forward get that forward replaced: ``router`` (the attribute holding it) gives the
    logits, ``route(block, logits) -> (weights, ids)`` the model's rule, the weights are cast to
    the activations' dtype. ``own_router`` blocks keep their router (DeepSeek's grouped top-k,
    expert bias, scaling) and hand ``moe(x, ids, weights)`` its result: only ``moe`` is
    replaced.
    """

    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str = "gate"
    route: Callable = _softmax_topk("flag")
    own_router: bool = False


_MIXTRAL = BlockKind(("w1", "w3", "w2"), route=_softmax_topk("always"))
_ROUTES_ITSELF = BlockKind(own_router=True)
BLOCKS: dict[str, BlockKind] = {
    **dict.fromkeys(("Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
                     "Qwen3NextSparseMoeBlock", "Qwen3OmniMoeThinkerTextSparseMoeBlock",
                     "Qwen3OmniMoeTalkerTextSparseMoeBlock", "OlmoeSparseMoeBlock",
                     "FlexOlmoSparseMoeBlock"), BlockKind()),
    "MixtralSparseMoeBlock": _MIXTRAL,
    "MiniMaxSparseMoeBlock": _MIXTRAL,
    "PhimoeSparseMoeBlock": BlockKind(("w1", "w3", "w2"), route=_model_route("sparsemixer")),
    "JambaSparseMoeBlock": BlockKind(router="router", route=_softmax_topk("never")),
    "HunYuanMoEV1Moe": BlockKind(route=_softmax_topk("always")),
    "Ernie4_5_MoeSparseMoeBlock": BlockKind(route=_ernie_route),
    **dict.fromkeys(("DeepseekV2MoE", "DeepseekV3MoE", "Dots1MoE", "Glm4MoeMoE",
                     "Glm4vMoeTextMoE", "LongcatFlashMoE"), _ROUTES_ITSELF),
}
_ORIGINAL = "_groupmoe_original_forward"
_warned: set[tuple[str, str]] = set()


def _kind(block: nn.Module) -> BlockKind:
    return BLOCKS[type(block).__name__]


def _router(block: nn.Module) -> nn.Module | None:
    return getattr(block, _kind(block).router, None)


def _mlps(block: nn.Module) -> list[nn.Module]:
    """The experts that compute: all but LongCat-Flash's zero-compute identity experts, which
    come after them."""
    return [e for e in block.experts if not isinstance(e, nn.Identity)]


def _projections(block: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    names = _kind(block).projections
    return [tuple(getattr(e, n, None) for n in names) for e in _mlps(block)]


def _base(lin: nn.Module | None) -> nn.Module | None:
    """The expert's own Linear under peft's adapter layers."""
    while lin is not None and hasattr(lin, "base_layer"):
        lin = lin.base_layer
    return lin


def _lora(block: nn.Module, runtime: bool) -> ExpertLoRA | str | None:
    """The experts' peft LoRA as stacked factors (gate and up side by side), ``None`` without
    adapters, or why it cannot run grouped."""
    projs = _projections(block)
    names = _kind(block).projections
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
    if not _kind(block).own_router and not isinstance(_router(block), nn.Module):
        return f"no router module at {_kind(block).router!r}"
    n = len(_mlps(block))
    if any(not isinstance(e, nn.Identity) for e in list(block.experts)[n:]):
        return "identity experts mixed in among the computing ones"
    if n < len(block.experts) and (not _kind(block).own_router or _is_4bit(block)):
        return "identity experts outside a moe() method, or with 4-bit experts"
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
    first = _base(_projections(block)[0][0])  # an expert's gate projection: the input width
    w = first.weight
    dtype = w.quant_state.dtype if q4.is_4bit(first) else w.dtype
    # with autograd on: bitsandbytes repacks 4-bit weights for its CPU kernel in a no-grad eval
    # call, a layout groupmoe does not read
    probe = torch.zeros(1, 1, first.in_features, dtype=dtype, device=w.device,
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


def _check_call(block: nn.Module, x: torch.Tensor):
    """``(lora, lins, None)`` when this call runs grouped, else ``(.., .., why)`` (warned)."""
    lora = _lora(block, runtime=True)
    lins = _base_lins(block)
    reason = lora if isinstance(lora, str) else _runtime_reason(lins, x)
    if reason is not None:
        key = (type(block).__name__, reason)
        if key not in _warned:
            _warned.add(key)
            log.warning("groupmoe: %s runs its original forward: %s", key[0], reason)
    return lora, lins, reason


def _experts(block: nn.Module, lins, lora, x: torch.Tensor, ids: torch.Tensor,
             weights: torch.Tensor, zero_expert: bool = False) -> torch.Tensor:
    # ids are topk over the router's scores: in range, so the experts skip the range check
    # and its device sync per layer
    if q4.is_4bit(lins[0][0]):
        gate_up, down = q4.nf4_stacks(block, lins)
        experts = QuantizedGroupedExperts(gate_up, down, SwiGLU(), compute_dtype=x.dtype)
        return experts(x, ids, weights, lora=lora, check_ids=False)
    return _dense_experts(lins, x, ids, weights, lora, zero_expert)


def grouped_moe(self: nn.Module, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
    """Replacement ``moe`` of blocks that route themselves (DeepSeek-style): the routed
    experts, grouped; fp32 router weights keep the original's fp32 result."""
    lora, lins, reason = _check_call(self, hidden_states)
    if reason is not None:
        return getattr(self, _ORIGINAL)(hidden_states, topk_indices, topk_weights)
    n = len(lins[0])
    if n == len(self.experts):
        out = _experts(self, lins, lora, hidden_states, topk_indices, topk_weights)
        return out.to(torch.promote_types(out.dtype, topk_weights.dtype))
    # LongCat's identity experts (ids >= n): their slots go to one extra all-zero expert in
    # the grouped op (no data-dependent shapes), and w * x is added outside it
    identity = topk_indices >= n
    ids = topk_indices.masked_fill(identity, n)
    out = _experts(self, lins, lora, hidden_states, ids, topk_weights.masked_fill(identity, 0),
                   zero_expert=True)
    skip = (topk_weights * identity).sum(dim=-1, keepdim=True) * hidden_states
    return (out + skip).to(torch.promote_types(out.dtype, topk_weights.dtype))


_SHARED = ("shared_expert", "shared_mlp", "shared_experts")  # always-on experts, by family


def _logits(block: nn.Module, hidden_states: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The router's logits ``[tokens, E]``, as the model computes them: fp32 Linear routers
    (ERNIE 4.5) on fp32 input outside autocast; wrapped routers (Hunyuan's gate) on the
    block's input, which they reshape and cast themselves."""
    router = _router(block)
    if not isinstance(router, nn.Linear):
        return router(hidden_states).reshape(x.shape[0], -1)
    if router.weight.dtype == torch.float32 and x.dtype != torch.float32:
        with torch.autocast(x.device.type, enabled=False):
            return router(x.float())
    return router(x)


def grouped_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Replacement forward of a ModuleList MoE block (see module docstring)."""
    lora, lins, reason = _check_call(self, hidden_states)
    if reason is not None:
        return getattr(self, _ORIGINAL)(hidden_states)
    shape = hidden_states.shape
    # Mixtral's and Phi-MoE's training jitter: the jittered input feeds router and experts
    jitter = getattr(self, "jitter_noise", 0.0) or getattr(self, "input_jitter_noise", 0.0)
    if self.training and jitter > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - jitter, 1.0 + jitter)
    x = hidden_states.reshape(-1, shape[-1])
    router_logits = _logits(self, hidden_states, x)
    weights, ids = _kind(self).route(self, router_logits)
    out = _experts(self, lins, lora, x, ids, weights.to(x.dtype))
    shared = next((m for m in (getattr(self, n, None) for n in _SHARED) if m is not None), None)
    if shared is not None:
        y = shared(x)
        if getattr(self, "shared_expert_gate", None) is not None:  # Qwen2-MoE's sigmoid gate
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        out = out + y
    out = out.reshape(shape)
    return (out, router_logits) if self._groupmoe_returns_logits else out


def _pad_lora(lora: ExpertLoRA) -> ExpertLoRA:
    """``lora`` with a zero adapter for one more expert."""

    def pad(f: LoRAFactors | None) -> LoRAFactors | None:
        if f is None:
            return None
        return LoRAFactors(torch.cat([f.a, f.a.new_zeros(1, *f.a.shape[1:])]),
                           torch.cat([f.b, f.b.new_zeros(1, *f.b.shape[1:])]), f.scale)

    return ExpertLoRA(pad(lora.gate_up), pad(lora.down))


def _dense_experts(lins: list[list[nn.Module]], x: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor, lora: ExpertLoRA | None,
                   zero_expert: bool = False) -> torch.Tensor:
    """The routed experts on the experts' float weights (stacked inside the ops);
    ``zero_expert`` appends an expert of zeros (id ``len(lins[0])``, its output zero)."""
    w1, w2 = _weight_pieces(lins)
    if zero_expert:
        w1 = w1 + [torch.zeros_like(w1[0]), torch.zeros_like(w1[1])]
        w2 = w2 + [torch.zeros_like(w2[0])]
        if lora is not None:
            lora = _pad_lora(lora)
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
        if _kind(block).own_router:
            setattr(block, _ORIGINAL, block.moe)
            block.moe = types.MethodType(grouped_moe, block)
            report.paths[name] = "fused expert op (swiglu) in moe(), the model's own router"
        else:
            report.paths[name] = "fused expert op (swiglu) in a grouped block forward"
            setattr(block, _ORIGINAL, block.forward)
            block._groupmoe_returns_logits = _returns_router_logits(block)
            block.forward = types.MethodType(grouped_block_forward, block)
        report.patched.append(name)
        if _is_4bit(block):
            report.quantized[name] = q4.describe(_base_lins(block))


def unpatch_modulelist_blocks(model: nn.Module) -> None:
    """Restore the original forwards (only those groupmoe replaced)."""
    for block in model.modules():
        if not hasattr(block, _ORIGINAL):
            continue
        for attr, fn in (("forward", grouped_block_forward), ("moe", grouped_moe)):
            if getattr(block.__dict__.get(attr), "__func__", None) is fn:
                del block.__dict__[attr]  # the class's own method shows through again
                delattr(block, _ORIGINAL)
                block.__dict__.pop("_groupmoe_returns_logits", None)
                q4.drop_cache(block)
