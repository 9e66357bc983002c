"""Expert parallelism on CPU over gloo: 2 and 4 processes against the single-process oracle.

Every rank builds the same global problem from one seed, runs its token slice through its
expert shard, and compares the output and every gradient with the oracle's matching slices.
One spawn per world size runs all cases (process start-up dominates the runtime).
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import finish, free_port
from groupmoe.nn import GroupedExperts, MoEBlock
from groupmoe.parallel import (
    WEIGHT_GRAD_STORE,
    ExpertParallel,
    local_expert_range,
    shard_expert_tensor,
)
from moe_cases import compiled_and_eager, make_case, rel_err, run

# (tokens per rank, H, I, E, k, load, activation, bias, impl, save)
CASES = {
    2: [
        ([13, 5], 12, 8, 4, 2, "random", "swiglu", False, "groupmoe", "h"),
        ([9, 0], 10, 6, 6, 2, "random", "gptoss", True, "groupmoe", "none"),
        # "skewed" routes only to experts [0, E/2): rank 1's shard gets no tokens.
        ([6, 11], 8, 6, 4, 2, "skewed", "swiglu", True, "groupmoe", "h"),
        ([7, 4], 8, 4, 8, 3, "single", "swiglu", False, "naive", "h"),
        ([5, 3], 8, 4, 4, 1, "random", "gptoss", True, "loop", "h"),
    ],
    4: [
        ([7, 0, 11, 3], 12, 8, 8, 2, "random", "swiglu", True, "groupmoe", "h"),
        ([5, 9, 2, 6], 8, 6, 8, 3, "skewed", "gptoss", True, "groupmoe", "none"),
        ([4, 4, 0, 8], 8, 4, 4, 2, "single", "swiglu", False, "naive", "h"),
    ],
}
TOL = 1e-11


def _entry(rank, world, port, fn):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world)
    finish(rank)
    # Every check has passed; skip interpreter teardown, where gloo's threads at times abort
    # the process ("terminate called without an active exception"), as the pipeline workers do.
    sys.stdout.flush()
    os._exit(0)


def _spawn(fn, world):
    mp.spawn(_entry, args=(world, free_port(), fn), nprocs=world, join=True)


def _full_experts(case, activation, bias):
    h, two_i = case.w1.shape[1:]
    full = GroupedExperts(h, two_i // 2, case.num_experts, activation, bias,
                          dtype=torch.float64)
    with torch.no_grad():
        for p, w in zip((full.gate_up, full.down, full.gate_up_bias, full.down_bias),
                        (case.w1, case.w2, case.b1, case.b2)):
            if p is not None:
                p.copy_(w)
    return full


def _check_parity(rank, world, seed, tokens, h, i, e, k, load, activation, bias, impl, save,
                  chunks=1):
    torch.manual_seed(seed)
    case = make_case(sum(tokens), h, i, e, k, torch.float64, bias, activation, load,
                     scale=4.0 if activation == "gptoss" else 1.0)
    ref, ref_grads, up = run(case, "loop")
    full = _full_experts(case, activation, bias)
    full.impl, full.save = impl, save
    ep = ExpertParallel.from_experts(full, overlap_chunks=chunks)
    assert ep.num_experts == e // world and ep.global_num_experts == e
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    x = case.x.detach()[lo:hi].clone().requires_grad_(True)
    gates = case.gates.detach()[lo:hi].clone().requires_grad_(True)
    deferred = impl == "groupmoe" and save == "none"  # these cases also defer dW
    if deferred:
        WEIGHT_GRAD_STORE.enable()
    out = ep(x, case.ids[lo:hi], gates)
    out.backward(up[lo:hi])
    if deferred:
        WEIGHT_GRAD_STORE.flush()
        WEIGHT_GRAD_STORE.disable()
        assert ep.gate_up.grad is None and ep.down.grad is None
        WEIGHT_GRAD_STORE.pop()
    what = f"rank {rank}, case {tokens, h, i, e, k, load, activation, bias, impl, save, chunks}"
    assert out.shape == (hi - lo, h) and out.dtype == torch.float64, what
    if hi > lo:
        assert rel_err(out, ref[lo:hi]) < 1e-12, what
        assert rel_err(x.grad, ref_grads["x"][lo:hi]) < TOL, what
        assert rel_err(gates.grad, ref_grads["gates"][lo:hi]) < TOL, what
    shard = local_expert_range(e, rank, world)
    mine = {"w1": ep.gate_up, "w2": ep.down, "b1": ep.gate_up_bias, "b2": ep.down_bias}
    for name, p in mine.items():
        if p is None:
            continue
        want = ref_grads[name][shard.start:shard.stop]
        if want.abs().max() == 0:  # a shard that got no tokens
            assert p.grad is None or p.grad.abs().max() == 0, (what, name)
        else:
            assert rel_err(p.grad, want) < TOL, (what, name)


def _kept_slots(ids, num_experts, factor):
    """``[T, k]`` mask of the (token, slot) pairs a rank sends under ``capacity_factor``: per
    expert the first ``ceil(factor * T * k / E)`` in expert-sorted (token, slot) order."""
    import math

    cap = math.ceil(factor * ids.numel() / num_experts)
    seen = [0] * num_experts
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            keep[t, s] = seen[e] < cap
            seen[e] += 1
    return keep


def _check_capacity(rank, world, chunks=1):
    """A hot expert under a capacity factor: the rows past capacity are dropped (their slot adds
    nothing, gets no gradient), which equals the oracle with those router weights zeroed;
    a factor large enough to drop nothing changes nothing. Pipelined in chunks, the capacity
    holds per call: the same rows are dropped."""
    from groupmoe.ops import expert_mlp_reference

    tokens, e, k = [11, 7], 4, 2
    torch.manual_seed(11)
    case = make_case(sum(tokens), 8, 6, e, k, torch.float64, True, "swiglu", "skewed")
    up = torch.randn(sum(tokens), 8, dtype=torch.float64)
    full = _full_experts(case, "swiglu", True)
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    bounds = [(sum(tokens[:r]), sum(tokens[:r + 1])) for r in range(world)]
    outs = {}
    for factor in (None, 100.0, 0.75):
        ep = ExpertParallel.from_experts(full, capacity_factor=factor, overlap_chunks=chunks)
        x = case.x.detach()[lo:hi].clone().requires_grad_(True)
        gates = case.gates.detach()[lo:hi].clone().requires_grad_(True)
        out = ep(x, case.ids[lo:hi], gates)
        out.backward(up[lo:hi])
        outs[factor] = (out.detach(), x.grad, gates.grad, ep)
    assert torch.equal(outs[None][0], outs[100.0][0])
    assert outs[100.0][3].drop_stats["dropped"] == 0
    out, dx, dgates, ep = outs[0.75]
    keep = torch.cat([_kept_slots(case.ids[a:b], e, 0.75) for a, b in bounds])
    assert ep.drop_stats["dropped"] == int((~keep[lo:hi]).sum())
    assert int((~keep).sum()) > 0  # the skewed load overflows somewhere
    x = case.x.detach().clone().requires_grad_(True)
    gates = case.gates.detach().clone().requires_grad_(True)
    w = [t.detach().clone().requires_grad_(True) if t is not None else None
         for t in (case.w1, case.w2, case.b1, case.b2)]
    ref = expert_mlp_reference(x, case.ids, gates * keep, *w, "swiglu")
    ref.backward(up)
    assert rel_err(out, ref.detach()[lo:hi]) < 1e-12
    assert rel_err(dx, x.grad[lo:hi]) < TOL and rel_err(dgates, gates.grad[lo:hi]) < TOL
    shard = local_expert_range(e, rank, world)
    for p, want in zip((ep.gate_up, ep.down, ep.gate_up_bias, ep.down_bias), w):
        assert rel_err(p.grad, want.grad[shard.start:shard.stop]) < TOL


def _check_transformers(rank, world, name):
    """shard_experts over a tiny transformers 5 model (Qwen3-MoE; gpt-oss: biases, interleaved
    clamped activation): each rank runs its own tokens; the sum of the ranks' losses and every
    gradient equal one process running all of them (replicated grads summed over ranks, each
    rank's expert slices as they are)."""
    import copy

    from groupmoe.parallel import shard_experts
    from test_transformers import build, tokens

    ref = build(name, dtype=torch.float64)
    batches = [tokens(batch=1, seq=7 + 3 * r, seed=r + 1) for r in range(world)]
    total = sum(ref(b, labels=b, use_cache=False).loss for b in batches)
    total.backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    sharded = shard_experts(model)
    assert len(sharded) == model.config.num_hidden_layers
    loss = model(batches[rank], labels=batches[rank], use_cache=False).loss
    loss.backward()
    got = {n: p.grad if p.grad is not None else torch.zeros_like(p)
           for n, p in model.named_parameters()}
    for n, g in got.items():
        if ".groupmoe_ep." not in n:
            dist.all_reduce(g)
            assert rel_err(g, want[n]) < TOL, (rank, name, n)
            continue
        experts = n.split(".groupmoe_ep.")[0]
        module = model.get_submodule(experts)
        stack = {"gate_up": "gate_up_proj", "down": "down_proj", "gate_up_bias":
                 "gate_up_proj_bias", "down_bias": "down_proj_bias"}[n.rsplit(".", 1)[1]]
        full = want[f"{experts}.{stack}"]
        if full.dim() == 3 and not module.is_transposed:
            full = full.transpose(-1, -2)
        mine = shard_expert_tensor(full, rank, world)
        assert rel_err(g, mine) < TOL, (rank, name, n)


def _check_mesh_2d(rank, world):
    """dp=2 x ep=2: MoEBlock with EP on "ep"; reducing the router grads over all ranks and the
    expert grads over "dp" gives the single-process grads of the whole batch (sum loss)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(7)
    tokens, h = [6, 9, 0, 5], 8
    block = MoEBlock(h, 6, 4, 2, expert_bias=True, dtype=torch.float64)
    x = torch.randn(sum(tokens), h, dtype=torch.float64)
    up = torch.randn_like(x)
    ref, _ = block(x)
    ref.backward(up)
    ref_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    block.experts = ExpertParallel.from_experts(block.experts, mesh, "ep")
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    out, _ = block(x[lo:hi])
    assert rel_err(out, ref[lo:hi]) < 1e-12 or hi == lo
    out.backward(up[lo:hi])
    ep_rank = mesh["ep"].get_local_rank()
    for name, p in block.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        expert = name.startswith("experts.")
        dist.all_reduce(g, group=mesh["dp"].get_group() if expert else None)
        want = ref_grads[name]
        if expert:
            want = shard_expert_tensor(want, ep_rank, 2)
        assert rel_err(g, want) < TOL, (rank, name)


def _check_compiled(rank, world):
    """torch.compile (default mode) over a block with expert parallel: dynamo breaks the graph
    around the dispatch (its split sizes are read back to the host) and compiles the rest;
    output and every gradient equal eager."""
    torch.manual_seed(3)
    block = MoEBlock(8, 6, 2 * world, 2, dtype=torch.float64)
    block.experts = ExpertParallel.from_experts(block.experts)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager")
    got, want = compiled_and_eager(compiled, block, torch.randn(4 + rank, 8, dtype=torch.float64),
                                   lambda r: r[0].square().sum())
    assert rel_err(got[0], want[0]) < TOL
    assert got[1].keys() == want[1].keys() == {"input", *dict(block.named_parameters())}
    for name in want[1]:
        assert rel_err(got[1][name], want[1][name]) < TOL, name


def _check_pipelined_backward_passes(rank, world):
    """The pipelined backward (overlap_chunks > 1) in the passes autograd offers: a kept graph
    run twice adds up, and a pass that asks for the input only (``autograd.grad(out, [x])``)
    leaves the expert weights alone, as the one-chunk path does."""
    torch.manual_seed(5)
    e = 2 * world
    full = GroupedExperts(8, 6, e, dtype=torch.float64)
    x = torch.randn(7 + rank, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(7 + rank)])
    gates = torch.rand(7 + rank, 2, dtype=torch.float64, requires_grad=True)
    up = torch.randn(7 + rank, 8, dtype=torch.float64)
    results = {}
    for chunks in (1, 3):
        ep = ExpertParallel.from_experts(full, overlap_chunks=chunks)
        x.grad = gates.grad = None
        out = ep(x, ids, gates)
        if chunks > 1:  # the experts' output rows are freed once sent back
            node = out.grad_fn.next_functions[0][0].next_functions[0][0]
            assert type(node).__name__ == "_PipelineBackward"
            assert all(y.untyped_storage().nbytes() == 0 for _, _, y in node.inner)
        out.backward(up, retain_graph=True)
        out.backward(up)
        only_x = torch.autograd.grad(ep(x, ids, gates), [x], up)[0]
        results[chunks] = (x.grad, gates.grad, ep.gate_up.grad, ep.down.grad, only_x)
    for got, want in zip(results[3], results[1]):
        assert rel_err(got, want) < TOL
    assert rel_err(results[3][0], 2 * results[3][4]) < TOL  # twice the one-pass gradient
    # under activation checkpointing (non-reentrant): the recompute rebuilds the chunks' local
    # graphs, and the same gradients come out
    from torch.utils.checkpoint import checkpoint

    ep = ExpertParallel.from_experts(full, overlap_chunks=3)
    x.grad = gates.grad = None
    checkpoint(ep, x, ids, gates, use_reentrant=False).backward(up)
    for got, want in zip((x.grad, gates.grad, ep.gate_up.grad, ep.down.grad), results[1]):
        assert rel_err(got, want / 2) < TOL  # results: two backward passes each


def _check_fp8(rank, world):
    """precision="fp8" sharded: each row and each expert column is quantized the same wherever
    it is computed, so expert parallel equals the unsharded FP8 module (fp32, CPU emulation)."""
    torch.manual_seed(6)
    e, t = 2 * world, 6
    full = GroupedExperts(16, 8, e, precision="fp8")
    x = torch.randn(world * t, 16, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(world * t)])
    gates = torch.rand(world * t, 2, requires_grad=True)
    up = torch.randn(world * t, 16)
    full(x, ids, gates).backward(up)
    mine = slice(rank * t, (rank + 1) * t)
    shard = local_expert_range(e, rank, world)
    for chunks in (1, 3):
        ep = ExpertParallel.from_experts(full, overlap_chunks=chunks)
        assert ep.precision == "fp8"
        xr = x.detach()[mine].clone().requires_grad_(True)
        gr = gates.detach()[mine].clone().requires_grad_(True)
        ep(xr, ids[mine], gr).backward(up[mine])
        assert rel_err(xr.grad, x.grad[mine]) < 1e-5 and rel_err(gr.grad, gates.grad[mine]) < 1e-5
        for p, w in ((ep.gate_up, full.gate_up), (ep.down, full.down)):
            assert rel_err(p.grad, w.grad[shard.start:shard.stop]) < 1e-5


def _expect_error(match, fn):
    with pytest.raises(ValueError, match=match):
        fn()


def _check_overlap_errors():
    with pytest.raises(ValueError, match="overlap_chunks must be an int >= 1"):
        ExpertParallel(8, 4, 4, overlap_chunks=0)


def _check_errors(rank, world):
    group = dist.group.WORLD
    _expect_error("not divisible", lambda: ExpertParallel(8, 4, world + 1, group=group))
    _expect_error("all ranks of the group must agree", lambda: ExpertParallel(
        8 + (rank == 1), 4, 2 * world, group=group))
    ep = ExpertParallel(8, 4, 2 * world, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    gates = torch.rand(5, 2, dtype=torch.float64)
    ids = torch.randint(0, 2 * world, (5, 2))
    bad = ids.clone()
    if rank == 1:
        bad[2, 1] = 2 * world
    _expect_error("out of range" if rank == 1 else r"rank\(s\) \[1\]", lambda: ep(x, bad, gates))
    k = 1 if rank == 0 else 2
    _expect_error("top_k: ", lambda: ep(x, ids[:, :k], gates[:, :k]))
    _expect_error("require grad: ", lambda: ep(x, ids, gates.requires_grad_(rank == 0)))
    # The group is still usable after the errors above (they are raised after the exchange).
    assert ep(x, ids, gates.detach()).shape == (5, 8)


def _worker(rank, world):
    for seed, args in enumerate(CASES[world]):
        _check_parity(rank, world, seed, *args)
    # pipelined in chunks: 3 (a rank with 0 tokens, deferred dW, a shard without tokens, every
    # impl), and more chunks than some ranks have tokens
    for seed, args in enumerate(CASES[world]):
        _check_parity(rank, world, seed, *args, chunks=3)
    _check_parity(rank, world, 0, *CASES[world][0], chunks=8)
    _check_pipelined_backward_passes(rank, world)
    if world == 4:
        _check_mesh_2d(rank, world)
    else:
        _check_compiled(rank, world)
        _check_capacity(rank, world)
        _check_capacity(rank, world, chunks=3)
        _check_fp8(rank, world)
        for name in ("qwen3_moe", "gpt_oss"):
            _check_transformers(rank, world, name)
    _check_errors(rank, world)
    _check_overlap_errors()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_gloo(world):
    _spawn(_worker, world)


def test_needs_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ValueError, match="not initialized"):
        ExpertParallel(8, 4, 4)
