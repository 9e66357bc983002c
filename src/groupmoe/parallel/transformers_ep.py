"""Expert parallelism inside a transformers 5 MoE model: each experts module's stacks sharded
across the ranks of a group (:func:`shard_experts`).

Every experts module on transformers' experts interface gets an :class:`ExpertParallel` child,
``groupmoe_ep``, holding this rank's slice of its stacks (and biases) in groupmoe's layout; the
module's own stacks are removed. groupmoe's experts implementation hands the module's hidden
states, global expert ids and router weights to that child, which all-to-alls the rows to the
ranks owning the experts and back. Routers, shared experts and everything else stay the
model's (replicated; reduce their gradients over the group as data parallel does).
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.transformers import Generic, _first_stack, _is_v5_experts, _raw, _weights, patch
from ..ops.checks import check
from .expert_parallel import ExpertParallel, resolve_group, shard_expert_tensor


def shard_experts(model: nn.Module, group=None, mesh_dim: str | int | None = None,
                  capacity_factor: float | None = None) -> list[str]:
    """Shard the experts of every MoE layer of ``model`` (transformers 5) across ``group``
    (a ``ProcessGroup``, a ``DeviceMesh`` with ``mesh_dim``, or ``None``: the world) and patch
    the model to groupmoe. Call it on every rank, with the same weights everywhere (rank ``r``
    keeps experts ``[r E/w, (r+1) E/w)``). Returns the names of the sharded modules.

    Every rank must then run every MoE layer on each step (the all-to-alls are collectives),
    even with no tokens. Families on groupmoe's generic grouped path and 4-bit stacks are
    refused.
    """
    pg = resolve_group(group, mesh_dim)
    report = patch(model)  # checks each module and prepares its activation
    sharded = []
    for name, module in model.named_modules():
        if not _is_v5_experts(module) or hasattr(module, "groupmoe_ep"):
            continue
        act = getattr(module, "_groupmoe_act", None)
        why = report.skipped.get(name) if act is None else (
            f"the generic grouped path ({act.why})" if isinstance(act, Generic) else None)
        check(why is None, f"shard_experts: {name} cannot run expert parallel: {why}")
        check(not nn.utils.parametrize.is_parametrized(module),
              f"shard_experts: {name} has parametrized (4-bit or peft) stacks")
        first = _first_stack(module)
        w1, w2 = _weights(module, first), _weights(module, "down_proj")  # [E, in, out]
        b1 = _raw(module, f"{first}_bias") if module.has_bias else None
        b2 = _raw(module, "down_proj_bias") if module.has_bias else None
        ep = ExpertParallel(w1.shape[1], w2.shape[1], w1.shape[0], act, b1 is not None,
                            group=pg, capacity_factor=capacity_factor, device=w1.device,
                            dtype=w1.dtype)
        with torch.no_grad():
            for mine, full in ((ep.gate_up, w1), (ep.down, w2), (ep.gate_up_bias, b1),
                               (ep.down_bias, b2)):
                if full is not None:
                    mine.copy_(shard_expert_tensor(full, ep.rank, ep.world_size))
                    mine.requires_grad_(full.requires_grad)
        for stack in (first, "down_proj", f"{first}_bias", "down_proj_bias"):
            if stack in module._parameters:
                del module._parameters[stack]
        module.groupmoe_ep = ep
        sharded.append(name)
    return sharded
