"""Expert parallelism over ``torch.distributed``: each rank of a group holds ``E / world`` experts.

Data flow of one call on every rank of the expert-parallel (EP) group::

    sort (token, slot) pairs by global expert -> exchange per-expert counts (all_to_all)
    -> all_to_all the token rows and their router weights to the ranks owning the experts
    -> local grouped expert MLP (router weight applied before the down projection)
    -> reverse all_to_all of the weighted rows -> fp32 sum over the k slots onto the tokens

Both all-to-alls are autograd nodes whose backward is the reverse exchange, so ``x``, the router
weights and the local expert weights all get their gradients. The transport is PyTorch's own
``all_to_all_single`` (NCCL on GPUs, gloo on CPU). With ``overlap_chunks > 1`` the tokens go
through this in chunks, pipelined in both directions: the exchanges are issued
asynchronously so that chunk ``c``'s experts (forward, then backward) run while chunk
``c + 1``'s rows (then output gradients) travel out and chunk ``c``'s results (then input
gradients) travel back.

Composing with data parallel / FSDP2 (2-D mesh)
-----------------------------------------------
Use a ``("dp", "ep")`` :class:`~torch.distributed.device_mesh.DeviceMesh` of ``dp * ep`` ranks.
Every rank reads its own batch. Expert weights are split along ``"ep"`` (the rank at ep
coordinate ``j`` holds experts ``[j E/ep, (j+1) E/ep)``) and replicated along ``"dp"``;
every other parameter (attention, norms, router, shared expert, embeddings) is replicated on
all ``dp * ep`` ranks::

    mesh = init_device_mesh("cuda", (dp, ep), mesh_dim_names=("dp", "ep"))
    block.experts = ExpertParallel.from_experts(block.experts, mesh, "ep")
    fully_shard(block.experts, mesh=mesh["dp"])       # experts: FSDP over dp only
    block.experts.set_gradient_divide_factor(dp * ep)  # see below
    fully_shard(model, mesh=init_device_mesh("cuda", (dp * ep,)))  # the rest: all ranks

An expert's gradient on one rank already sums the contributions of the tokens of all ``ep``
peers, so reducing it over ``"dp"`` sums over every token of the global batch; dividing by
``dp * ep`` (not FSDP's default ``dp``) gives the same scale as the non-expert gradients,
which are averaged over all ``dp * ep`` ranks. Without FSDP, all-reduce the expert gradients
over ``mesh["dp"].get_group()`` and the rest over the world group, with the same divisors.

Every rank of the EP group must call forward and backward of each layer (they are collectives),
even with no tokens; the output must take part in the loss on every rank.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from ..nn.experts import GroupedExperts, Impl
from ..ops.activations import Activation
from ..ops.checks import check, check_expert_ids
from ..ops.experts import Precision, SaveMode, gather_sum
from ..ops.routing import Routing, build_routing

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
log = logging.getLogger("groupmoe")


def resolve_group(group=None, mesh_dim: str | int | None = None) -> dist.ProcessGroup:
    """The process group of ``group``: a ``ProcessGroup``, a ``DeviceMesh`` with ``mesh_dim``
    (optional for a 1-D mesh), or ``None`` for the default (world) group."""
    check(dist.is_available() and dist.is_initialized(),
          "ExpertParallel: torch.distributed is not initialized (call init_process_group)")
    if group is None:
        check(mesh_dim is None, "ExpertParallel: mesh_dim given without a DeviceMesh")
        return dist.group.WORLD
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        check(mesh_dim is not None or group.ndim == 1,
              f"ExpertParallel: a {group.ndim}-D DeviceMesh needs mesh_dim (one of "
              f"{group.mesh_dim_names})")
        return group.get_group(mesh_dim) if mesh_dim is not None else group.get_group()
    check(mesh_dim is None, "ExpertParallel: mesh_dim is only meaningful with a DeviceMesh")
    return group


def local_expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """Global ids of the experts held by ``rank``: a contiguous slice of ``E / world_size``."""
    check(world_size >= 1 and 0 <= rank < world_size,
          f"local_expert_range: rank {rank} out of range for world size {world_size}")
    check(num_experts % world_size == 0,
          f"ExpertParallel: {num_experts} experts are not divisible by the expert-parallel "
          f"world size {world_size}")
    per = num_experts // world_size
    return range(rank * per, (rank + 1) * per)


def shard_expert_tensor(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice along dim 0 of a full ``[E, ...]`` expert stack (a view)."""
    r = local_expert_range(t.shape[0], rank, world_size)
    return t[r.start:r.stop]


def _issue(tensors, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
           ) -> tuple[list, list[torch.Tensor]]:
    """``all_to_all_single`` of row tensors sharing the same splits, issued without waiting
    (``async_op``): ``(works, outputs)``, the outputs valid once every work has been waited
    on (on CUDA the current stream waits; the host does not)."""
    works, outs = [], []
    for t in tensors:
        out = t.new_empty((sum(out_splits), *t.shape[1:]))
        works.append(dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits,
                                            group=group, async_op=True))
        outs.append(out)
    return works, outs


def _wait(issued: tuple[list, list[torch.Tensor]]) -> list[torch.Tensor]:
    works, outs = issued
    for work in works:
        work.wait()
    return outs


class _Exchange(torch.autograd.Function):
    """Synchronous ``all_to_all_single`` of row tensors sharing the same splits; backward is
    the reverse exchange of every input that needs a gradient (autograd hands zeros for an
    unused output, so all ranks exchange the same tensors)."""

    @staticmethod
    def forward(ctx, group, out_splits, in_splits, *tensors):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return tuple(_wait(_issue(tensors, out_splits, in_splits, group)))

    @staticmethod
    def backward(ctx, *grads):
        need = ctx.needs_input_grad[3:]
        rows = [g for g, n in zip(grads, need) if n]
        back = iter(_wait(_issue(rows, ctx.in_splits, ctx.out_splits, ctx.group)))
        return (None, None, None, *(next(back) if n else None for n in need))


class _Pipeline(torch.autograd.Function):
    """The exchanges and local experts of every token chunk as one autograd node, pipelined in
    both directions. Forward: chunk ``c + 1``'s rows travel to their experts while chunk
    ``c``'s experts run, and chunk ``c``'s results travel back right after. Backward, by hand:
    chunk ``c + 1``'s output gradient travels to the experts while chunk ``c``'s expert
    backward runs (a local autograd graph kept from the forward), and chunk ``c``'s input
    gradients travel back right after. Every rank issues the collectives in the same order.
    (One chunk takes plain autograd nodes instead: :class:`_Exchange` around the experts.)

    Inputs: ``(ep, plans, grad, *sends, *params)``: ``sends`` the chunks' expert-sorted rows
    and router weights, two per chunk; ``params`` the local expert parameters, inputs so that
    the outputs require grad when only they do. Their gradients are accumulated by the local
    backward itself, as an unpipelined backward would (or handed to an active
    WeightGradStore); a pass that leaves them out (``torch.autograd.grad(out, [x])``,
    ``backward(inputs=...)``) leaves them out here too. Outputs: each chunk's returned rows."""

    @staticmethod
    def forward(ctx, ep, plans, grad, *flat):
        n = len(plans)
        sends, params = flat[:2 * n], flat[2 * n:]
        group = ep.group

        def dispatch(c):
            in_splits, out_splits, _ = plans[c]
            return _issue(sends[2 * c:2 * c + 2], out_splits, in_splits, group)

        inner, returns = [], []
        issued = dispatch(0)
        for c, (in_splits, out_splits, local_ids) in enumerate(plans):
            current = issued
            if c + 1 < n:  # in flight while this chunk computes
                issued = dispatch(c + 1)
            x_recv, g_recv = _wait(current)
            # received rows are fresh leaves of this chunk's local graph
            x_recv.requires_grad_(grad and sends[2 * c].requires_grad)
            g_recv.requires_grad_(grad and sends[2 * c + 1].requires_grad)
            with torch.set_grad_enabled(grad):
                y_recv = GroupedExperts.forward(ep, x_recv, local_ids.unsqueeze(1),
                                                g_recv.unsqueeze(1), check_ids=False)
            inner.append((x_recv, g_recv, y_recv))
            returns.append(_issue([y_recv.detach()], in_splits, out_splits, group))
        outs = tuple(_wait(r)[0] for r in returns)
        for _, _, y_recv in inner:
            # backward needs this output's graph, not its data (the local experts' backward
            # keeps none of its output): free the rows instead of holding them until then
            if y_recv.requires_grad:
                y_recv.untyped_storage().resize_(0)
        ctx.group, ctx.plans, ctx.inner = group, plans, inner
        ctx.weight_nodes = [torch.autograd.graph.get_gradient_edge(p).node
                            for p in params if p.requires_grad]
        return outs

    @staticmethod
    def backward(ctx, *dys):
        plans, group = ctx.plans, ctx.group
        n = len(plans)
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        # does this pass accumulate the expert weights' gradients?
        weights = all(torch._C._will_engine_execute_node(node) for node in ctx.weight_nodes)

        def to_experts(c):  # the reverse of chunk c's return exchange (autograd hands zeros
            in_splits, out_splits, _ = plans[c]  # for an unused chunk)
            return _issue([dys[c]], out_splits, in_splits, group)

        returns = []
        issued = to_experts(0)
        for c, (in_splits, out_splits, _) in enumerate(plans):
            current = issued
            if c + 1 < n:  # in flight while this chunk's expert backward runs
                issued = to_experts(c + 1)
            (dy_recv,) = _wait(current)
            x_recv, g_recv, y_recv = ctx.inner[c]
            leaves = [t for t in (x_recv, g_recv) if t.requires_grad]
            if not y_recv.requires_grad:  # e.g. no rows came: an output without a graph
                grads = [None] * len(leaves)
            elif weights:  # weights (or the store) and the received rows' grads in one pass
                torch.autograd.backward(y_recv, dy_recv, retain_graph=keep)
                grads = [t.grad for t in leaves]
                for t in leaves:
                    t.grad = None
            elif leaves:
                grads = torch.autograd.grad(y_recv, leaves, dy_recv, retain_graph=keep,
                                            allow_unused=True)
            else:
                grads = []
            back = [torch.zeros_like(t) if d is None else d  # every rank sends the same
                    for t, d in zip(leaves, grads)]
            returns.append(_issue(back, in_splits, out_splits, group))
        send_grads = []
        for c, r in enumerate(returns):
            got = iter(_wait(r))
            send_grads += [next(got) if t.requires_grad else None for t in ctx.inner[c][:2]]
        if not keep:
            ctx.inner = None
        return (None, None, None, *send_grads, *[None] * (len(ctx.needs_input_grad) - 3 - 2 * n))


class _Dispatch(torch.autograd.Function):
    """Token rows in expert-sorted order, ``x[token_index]``; backward sums the k slots of
    each token in fp32 (the adjoint of :class:`_Combine`)."""

    @staticmethod
    def forward(ctx, x, routing: Routing):
        ctx.routing, ctx.dtype = routing, x.dtype
        return x.index_select(0, routing.token_index)

    @staticmethod
    def backward(ctx, drows):
        return gather_sum(drows, ctx.routing, ctx.dtype), None


class _Combine(torch.autograd.Function):
    """``out[t] = sum_s rows[(t, s)]`` accumulated in fp32, cast once; backward gathers."""

    @staticmethod
    def forward(ctx, rows, routing: Routing):
        ctx.routing = routing
        return gather_sum(rows, routing, rows.dtype)

    @staticmethod
    def backward(ctx, dout):
        return dout.index_select(0, ctx.routing.token_index), None


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _decode(name: str, value: int):
    if name.endswith("dtype"):
        return _DTYPES[value] if value < len(_DTYPES) else "other"
    return value


class ExpertParallel(GroupedExperts):
    """:class:`GroupedExperts` sharded over a process group: this rank holds experts
    ``[rank * E/world, (rank+1) * E/world)``, tokens travel to them by all-to-all.

    Drop-in for ``MoEBlock.experts`` (same ``forward(x, expert_ids, gate_weights)`` with global
    expert ids, same parameter names holding only the local slice, so ``gate_up`` is
    ``[E/world, H, 2I]``). ``num_experts`` is the local count, ``global_num_experts`` ``E``.
    Per-rank token counts may differ, including zero. Build it on every rank of the group
    (construction compares the configs of all ranks); see the module docstring for meshes.

    Args:
        hidden_size, intermediate_size, num_experts: global expert shapes (``E`` in total).
        activation, bias, impl, save, precision: as in :class:`GroupedExperts` (the local
            compute).
        group: a ``ProcessGroup``, a ``DeviceMesh`` (with ``mesh_dim``), or ``None`` (world).
        capacity_factor: ``None`` (default) sends every routed row. A number ``c`` bounds what
            one rank sends to one expert per call to ``ceil(c * T * k / E)`` rows (``T`` its
            tokens), so a hot expert cannot flood its rank's memory; the rows past it (later
            tokens first, in expert-sorted order) are dropped: their slot adds nothing to the
            output and gets no gradient. :attr:`drop_stats` counts them; the first drop is
            logged.
        overlap_chunks: split each call's tokens into this many chunks and pipeline them: the
            dispatch exchange of chunk ``c + 1`` and the combine exchange of chunk ``c - 1``
            are in flight while chunk ``c``'s experts run, and the same in backward. One
            count exchange and one host sync per call whatever the count. ``1`` (default) is
            the unpipelined path; results are equal either way (up to the summation order of
            the weight gradients over chunks). Pipelined, the backward accumulates the expert
            weights' gradients itself (into ``.grad`` or an active WeightGradStore), so
            ``torch.autograd.grad`` with respect to them returns nothing: take them from
            ``.grad``. With ``capacity_factor`` the capacity holds per call, across chunks.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 activation: str | Activation = "swiglu", bias: bool = False,
                 impl: Impl = "groupmoe",
                 save: SaveMode | None = None, group=None, mesh_dim: str | int | None = None,
                 weight_grad: bool | None = None, capacity_factor: float | None = None,
                 overlap_chunks: int = 1, precision: Precision = "default", device=None,
                 dtype=None):
        check(capacity_factor is None or capacity_factor > 0,
              f"ExpertParallel: capacity_factor must be > 0 or None, got {capacity_factor}")
        check(isinstance(overlap_chunks, int) and overlap_chunks >= 1,
              f"ExpertParallel: overlap_chunks must be an int >= 1, got {overlap_chunks!r}")
        pg = resolve_group(group, mesh_dim)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        config = (num_experts, hidden_size, intermediate_size, str(activation), bool(bias),
                  str(dtype or torch.get_default_dtype()), capacity_factor, overlap_chunks,
                  precision)
        configs: list = [None] * world
        dist.all_gather_object(configs, config, group=pg)
        for r, c in enumerate(configs):
            check(c == config,
                  f"ExpertParallel: rank {rank} has config (E, H, I, activation, bias, dtype, "
                  f"capacity_factor, overlap_chunks, precision) = "
                  f"{config} but rank {r} has {c}; all ranks of the group must agree")
        local = local_expert_range(num_experts, rank, world)
        # input_grad stays None: skipping dx on one rank would leave the backward
        # all-to-alls of the ranks out of step
        super().__init__(hidden_size, intermediate_size, len(local), activation, bias, impl,
                         save, weight_grad=weight_grad, precision=precision, device=device,
                         dtype=dtype)
        self.group, self.world_size, self.rank = pg, world, rank
        self.global_num_experts = num_experts
        self.expert_offset = local.start
        self.capacity_factor = capacity_factor
        self.overlap_chunks = overlap_chunks
        self.drop_stats = {"calls": 0, "rows": 0, "dropped": 0}

    @classmethod
    def from_experts(cls, experts: GroupedExperts, group=None,
                     mesh_dim: str | int | None = None,
                     capacity_factor: float | None = None,
                     overlap_chunks: int = 1) -> ExpertParallel:
        """Shard a full :class:`GroupedExperts` (same weights on every rank): keep this rank's
        slice of every stack. Call it on every rank of the group."""
        gate_up = experts.gate_up
        ep = cls(gate_up.shape[1], experts.down.shape[1], experts.num_experts,
                 experts.activation, experts.gate_up_bias is not None, experts.impl,
                 experts.save, group, mesh_dim, weight_grad=experts.weight_grad,
                 capacity_factor=capacity_factor, overlap_chunks=overlap_chunks,
                 precision=experts.precision, device=gate_up.device, dtype=gate_up.dtype)
        with torch.no_grad():
            for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
                full = getattr(experts, name)
                if full is not None:
                    getattr(ep, name).copy_(shard_expert_tensor(full, ep.rank, ep.world_size))
                    getattr(ep, name).requires_grad_(full.requires_grad)
        return ep

    def _chunks(self, tokens: int) -> list[tuple[int, int]]:
        """``overlap_chunks`` contiguous token ranges of near-equal size (some may be empty)."""
        n = self.overlap_chunks
        bounds = [tokens * c // n for c in range(n + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _route(self, x, expert_ids, gate_weights, check_ids: bool,
               chunks: list[tuple[int, int]]) -> tuple[list[Routing] | None, str]:
        """This rank's routing of each token chunk, or its input error: errors are raised on
        every rank after the count exchange, so that one rank's bad input never leaves the
        others waiting."""
        h = self.gate_up.shape[1]
        try:
            check(x.dim() == 2 and x.shape[1] == h,
                  f"x must be [tokens, {h}], got {tuple(x.shape)}")
            check(expert_ids.dim() == 2 and expert_ids.shape[0] == x.shape[0],
                  f"expert ids must be [{x.shape[0]}, top_k], got {tuple(expert_ids.shape)}")
            check(gate_weights.shape == expert_ids.shape,
                  f"router weights must be {tuple(expert_ids.shape)}, got "
                  f"{tuple(gate_weights.shape)}")
            check(gate_weights.is_floating_point() and gate_weights.device == x.device,
                  f"router weights must be floating point on {x.device}, got "
                  f"{gate_weights.dtype} on {gate_weights.device}")
            check(x.dtype == self.gate_up.dtype,
                  f"x is {x.dtype} but the expert weights are {self.gate_up.dtype}")
            check(x.device == self.gate_up.device,
                  f"x is on {x.device} but the expert weights are on {self.gate_up.device}")
            experts = self.global_num_experts
            if self.overlap_chunks == 1:
                return [build_routing(expert_ids, experts, check_ids=check_ids)], ""
            check_expert_ids(expert_ids, experts, "ExpertParallel", values=check_ids)
            return [build_routing(expert_ids[t0:t1], experts, check_ids=False)
                    for t0, t1 in chunks], ""
        except ValueError as e:
            return None, str(e)

    def _call_config(self, x, expert_ids, gate_weights, error: bool) -> list[int]:
        """What must agree across ranks on every call: shapes, dtypes, and the requires-grad
        pattern (it decides which backward collectives run)."""
        return [int(error), self.global_num_experts, self.gate_up.shape[1], self.down.shape[1],
                expert_ids.shape[-1] if expert_ids.dim() == 2 else -1,
                _dtype_code(x.dtype), _dtype_code(gate_weights.dtype),
                int(torch.is_grad_enabled()), int(x.requires_grad),
                int(gate_weights.requires_grad),
                int(any(w.requires_grad for w in self.parameters()))]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                gate_weights: torch.Tensor, *, check_ids: bool = True) -> torch.Tensor:
        """``x [T, H]``, global ``expert_ids [T, k]``, ``gate_weights [T, k]`` -> ``[T, H]``.

        ``T`` and the routing may differ per rank; every rank of the group must call it.
        ``check_ids=False`` skips the ids' range check (and its device sync) for ids in range
        by construction, as :meth:`GroupedExperts.forward <groupmoe.nn.GroupedExperts.forward>`.
        """
        world, per, n = self.world_size, self.num_experts, self.overlap_chunks
        chunks = self._chunks(x.shape[0])
        routings, error = self._route(x, expert_ids, gate_weights, check_ids, chunks)
        counts = torch.stack([r.counts for r in routings]) if routings is not None else \
            torch.zeros(n, self.global_num_experts, dtype=torch.long, device=x.device)
        keeps = None
        if self.capacity_factor is not None and routings is not None:
            counts, keeps = self._capacity(routings)
        mine = self._call_config(x, expert_ids, gate_weights, bool(error))
        config = torch.tensor(mine, dtype=torch.long, device=x.device)
        # Row r goes to rank r: per chunk the counts of its experts, then this call's config.
        send = torch.cat([counts.view(n, world, per).transpose(0, 1).reshape(world, n * per),
                          config.expand(world, -1)], 1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        width = send.shape[1]
        host = torch.cat([recv.view(-1), counts.view(-1)]).tolist()  # the one host sync
        rows = [host[r * width:(r + 1) * width] for r in range(world)]
        sent_host = host[recv.numel():]
        self._raise_on_mismatch(error, mine, [row[n * per:] for row in rows])

        e = self.global_num_experts
        plans = []  # per chunk: what this rank sends and receives, received rows' experts
        for c in range(n):
            sent = sent_host[c * e:(c + 1) * e]
            in_splits = [sum(sent[r * per:(r + 1) * per]) for r in range(world)]
            out_splits = [sum(row[c * per:(c + 1) * per]) for row in rows]
            # received rows come grouped by source rank, then by local expert
            local_ids = torch.repeat_interleave(
                torch.arange(per, device=x.device).repeat(world),
                recv.view(world, width)[:, c * per:(c + 1) * per].reshape(-1),
                output_size=sum(out_splits))
            plans.append((in_splits, out_splits, local_ids))
        kept = [None] * n
        sends = []
        for c, ((t0, t1), routing, (in_splits, _, _)) in enumerate(zip(chunks, routings, plans)):
            rows_sorted = _Dispatch.apply(x[t0:t1], routing)
            gates_sorted = gate_weights[t0:t1].reshape(-1).index_select(0, routing.order)
            if keeps is not None:
                kept[c] = self._kept_rows(keeps[c], sum(in_splits))
                rows_sorted, gates_sorted = rows_sorted[kept[c]], gates_sorted[kept[c]]
            sends.append((rows_sorted, gates_sorted))
        if keeps is not None:
            self._count_drops(sum(k.numel() for k in keeps), sum(map(len, kept)))

        if n == 1:
            in_splits, out_splits, local_ids = plans[0]
            x_recv, g_recv = _Exchange.apply(self.group, out_splits, in_splits, *sends[0])
            y_recv = super().forward(x_recv, local_ids.unsqueeze(1), g_recv.unsqueeze(1),
                                     check_ids=False)
            returned = _Exchange.apply(self.group, in_splits, out_splits, y_recv)
        else:
            params = [p for p in (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
                      if p is not None]
            flat = [t for pair in sends for t in pair]
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*flat, *params))
            returned = _Pipeline.apply(self, plans, grad, *flat, *params)
        outs = []
        for routing, y, rows in zip(routings, returned, kept):
            if rows is not None:  # dropped rows add nothing
                y = y.new_zeros(routing.num_rows, y.shape[1]).index_copy(0, rows, y)
            outs.append(_Combine.apply(y, routing))
        return outs[0] if n == 1 else torch.cat(outs)

    def _capacity(self, routings: list[Routing]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per chunk and expert the row counts clipped to the call's capacity, and per chunk
        which expert-sorted rows stay: an expert's first rows in (token, slot) order, across
        the chunks in turn."""
        counts = torch.stack([r.counts for r in routings])  # [chunks, E]
        rows = sum(r.num_rows for r in routings)
        cap = math.ceil(self.capacity_factor * rows / self.global_num_experts)
        before = counts.cumsum(0) - counts  # each expert's rows in earlier chunks
        keeps = []
        for routing, prior in zip(routings, before):
            starts = routing.offsets.long() - routing.counts - prior
            position = torch.arange(routing.num_rows, device=starts.device) - \
                starts.index_select(0, routing.expert_index.long())
            keeps.append(position < cap)
        return (cap - before).clamp(min=0).minimum(counts), keeps

    def _kept_rows(self, keep: torch.Tensor, n_kept: int) -> torch.Tensor:
        """Indices of the kept rows in order (a stable sort puts them first: no host sync)."""
        order = torch.argsort((~keep).to(torch.int8), stable=True)
        return order[:n_kept]

    def _count_drops(self, rows: int, kept: int) -> None:
        dropped = rows - kept
        self.drop_stats["calls"] += 1
        self.drop_stats["rows"] += rows
        self.drop_stats["dropped"] += dropped
        if dropped and not getattr(self, "_drop_logged", False):
            self._drop_logged = True
            log.warning("ExpertParallel (rank %d): capacity factor %s dropped %d of %d routed "
                        "rows in this call (drop_stats keeps the count)", self.rank,
                        self.capacity_factor, dropped, rows)

    def _raise_on_mismatch(self, error: str, mine: list[int], theirs: list[list[int]]) -> None:
        if error:
            raise ValueError(f"ExpertParallel (rank {self.rank}): {error}")
        bad = [r for r, c in enumerate(theirs) if c[0]]
        check(not bad, f"ExpertParallel (rank {self.rank}): rank(s) {bad} of the group failed "
              "their input checks (see their errors)")
        names = ("error", "E", "H", "I", "top_k", "x dtype", "router weight dtype",
                 "grad enabled", "x requires grad", "router weights require grad",
                 "expert weights require grad")
        for r, c in enumerate(theirs):
            diff = [f"{n}: {_decode(n, a)} vs {_decode(n, b)}"
                    for n, a, b in zip(names, mine, c) if a != b]
            check(not diff, f"ExpertParallel (rank {self.rank}): call differs from rank {r} "
                  f"({'; '.join(diff)}); all ranks must call with the same config")
