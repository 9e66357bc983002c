"""Expert parallelism over torch.distributed: each rank holds ``E / world`` experts.

Per step: sort the (token, slot) pairs by expert, exchange per-expert counts with one
``all_to_all_single``, send each pair's hidden row and router weight to the rank owning its
expert, run the local experts there with :func:`groupmoe.ops.expert_mlp` (the router weight
scales the activation before the down projection, so its gradient travels back too), send
the results back with the reverse all-to-all, and sum each token's ``top_k`` rows in fp32.
Both all-to-alls are differentiable (``torch.distributed.nn.functional``).

Composing with data parallel / FSDP2: build a 2-D ``DeviceMesh`` ``("dp", "ep")``; shard the
non-expert parameters (attention, router, norms) with FSDP2 over the whole mesh (or "dp"),
pass ``mesh["ep"].get_group()`` here, and shard the expert parameters with FSDP2 over
``mesh["dp"]`` only: each "ep" rank holds different experts, replicated across "dp".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..nn.experts import GroupedExperts
from ..ops.checks import check, check_expert_ids
from ..ops.experts import expert_mlp, gather_sum
from ..ops.routing import build_routing

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def shard_experts(full: GroupedExperts, rank: int, world: int) -> GroupedExperts:
    """The contiguous slice of ``full``'s experts that ``rank`` owns, as its own module."""
    e = full.num_experts
    check(e % world == 0, f"shard_experts: {e} experts do not divide over {world} ranks")
    lo, hi = rank * e // world, (rank + 1) * e // world
    h, two_i = full.gate_up.shape[1], full.gate_up.shape[2]
    local = GroupedExperts(h, two_i // 2, hi - lo, full.activation, full.gate_up_bias is not None,
                           full.impl, full.save, full.input_grad, full.weight_grad,
                           device=full.gate_up.device,
                           dtype=full.gate_up.dtype)
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(getattr(full, name)[lo:hi])
    return local


class ExpertParallel(nn.Module):
    """Routed experts sharded over a process group (or a DeviceMesh dimension).

    Args:
        local_experts: this rank's :class:`GroupedExperts` (``num_experts / world`` of them,
            e.g. from :func:`shard_experts`); rank ``r`` owns experts
            ``[r * E_local, (r + 1) * E_local)``.
        num_experts: the global number of experts ``E``.
        group: a process group, or ``None`` for the default one; or pass ``mesh`` and
            ``mesh_dim``.
    """

    def __init__(self, local_experts: GroupedExperts, num_experts: int, group=None,
                 mesh=None, mesh_dim: str | int | None = None):
        super().__init__()
        if mesh is not None:
            group = mesh.get_group(mesh_dim)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check(num_experts % self.world == 0,
              f"ExpertParallel: {num_experts} experts do not divide over {self.world} ranks")
        self.num_experts = num_experts
        self.local_count = num_experts // self.world
        check(local_experts.num_experts == self.local_count,
              f"ExpertParallel: rank {self.rank} holds {local_experts.num_experts} experts, "
              f"expected {num_experts} / {self.world} = {self.local_count}")
        self.experts = local_experts
        self._config_checked = False

    def _check_config(self, x: torch.Tensor, top_k: int) -> None:
        """All ranks must agree on E, H, I, top_k and dtype (one all_gather, first call)."""
        w = self.experts.gate_up
        mine = torch.tensor([self.num_experts, w.shape[1], w.shape[2], top_k,
                             _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1],
                            dtype=torch.int64, device=x.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        for r, other in enumerate(every):
            if not torch.equal(other, mine):
                raise ValueError(
                    f"ExpertParallel: rank {self.rank} has (E, H, 2I, top_k, dtype) = "
                    f"{mine.tolist()} but rank {r} has {other.tolist()}")
        self._config_checked = True

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                gate_weights: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, global ``expert_ids [T, k]``, ``gate_weights [T, k]`` -> ``[T, H]``.
        Token counts may differ between ranks."""
        check_expert_ids(expert_ids, self.num_experts, "ExpertParallel")
        if not self._config_checked:
            self._check_config(x, expert_ids.shape[1])
        routing = build_routing(expert_ids, self.num_experts)
        counts = routing.counts.view(self.world, self.local_count)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        rows = x.index_select(0, routing.token_index)
        gates = gate_weights.reshape(-1).index_select(0, routing.order)
        recv_rows = dist_fn.all_to_all_single(
            rows.new_empty(sum(recv_splits), x.shape[1]), rows, recv_splits, send_splits,
            self.group)
        recv_gates = dist_fn.all_to_all_single(
            gates.new_empty(sum(recv_splits)), gates, recv_splits, send_splits, self.group)
        # each source's chunk arrives sorted by expert: rebuild the local expert of each row
        local_ids = torch.arange(self.local_count, device=x.device).repeat(self.world)
        local_ids = local_ids.repeat_interleave(recv_counts.flatten()).unsqueeze(1)
        local = build_routing(local_ids, self.local_count)
        e = self.experts
        y = expert_mlp(recv_rows, local, recv_gates.unsqueeze(1), e.gate_up, e.down,
                       e.gate_up_bias, e.down_bias, e.activation, save=e.save,
                       weight_grad=e.weight_grad)
        back = dist_fn.all_to_all_single(y.new_empty(rows.shape[0], x.shape[1]), y, send_splits,
                                         recv_splits, self.group)
        return gather_sum(back, routing, x.dtype)
