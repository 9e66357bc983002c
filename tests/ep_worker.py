"""One rank of the expert-parallel test (run by test_expert_parallel.py over gloo)."""

import os
import sys

import torch
import torch.distributed as dist

from groupmoe.nn import GroupedExperts
from groupmoe.ops import expert_mlp_reference
from groupmoe.parallel import WEIGHT_GRAD_STORE
from groupmoe.parallel.expert_parallel import ExpertParallel, shard_experts

E, H, INTER, K = 8, 16, 12, 2


def global_problem(world, bias):
    torch.manual_seed(0)
    full = GroupedExperts(H, INTER, E, "gptoss" if bias else "swiglu", bias, dtype=torch.float64)
    tokens = [5 + 3 * r for r in range(world)]  # uneven token counts per rank
    x = torch.randn(sum(tokens), H, dtype=torch.float64)
    # experts of the last rank get no tokens at all
    ids = torch.stack([torch.randperm(E - E // world)[:K] for _ in range(sum(tokens))])
    gates = torch.randn(sum(tokens), K, dtype=torch.float64)  # signed: exact d-gate
    return full, tokens, x, ids, gates


def run(rank, world, bias, store):
    full, tokens, x, ids, gates = global_problem(world, bias)
    lo = sum(tokens[:rank])
    sl = slice(lo, lo + tokens[rank])
    # oracle on all tokens, in this process
    xr, gr = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    ref = expert_mlp_reference(xr, ids, gr, full.gate_up, full.down, full.gate_up_bias,
                               full.down_bias, full.activation)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    ref.backward(up)
    ep = ExpertParallel(shard_experts(full, rank, world), E)
    xl, gl = x[sl].clone().requires_grad_(True), gates[sl].clone().requires_grad_(True)
    if store:
        WEIGHT_GRAD_STORE.enable()
    out = ep(xl, ids[sl], gl)
    out.backward(up[sl])
    if store:
        WEIGHT_GRAD_STORE.flush()
        WEIGHT_GRAD_STORE.disable()
        assert ep.experts.gate_up.grad is None
        WEIGHT_GRAD_STORE.pop()
    err = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-300))  # noqa: E731
    assert err(out, ref[sl].detach()) < 1e-12
    assert err(xl.grad, xr.grad[sl]) < 1e-11 and err(gl.grad, gr.grad[sl]) < 1e-11
    per = E // world
    for name, p in ep.experts.named_parameters():
        want = getattr(full, name).grad[rank * per:(rank + 1) * per]
        if want.abs().max() == 0:  # this rank's experts got no tokens anywhere
            assert p.grad.abs().max() == 0, name
        else:
            assert err(p.grad, want) < 1e-11, (rank, name)


def main(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    run(rank, world, bias=False, store=False)
    run(rank, world, bias=True, store=True)
    # mismatched configs are reported, not hung on
    bad = GroupedExperts(H + 8 * (rank == 0), INTER, E // world, dtype=torch.float64)
    try:
        ExpertParallel(bad, E)(torch.randn(3, bad.gate_up.shape[1], dtype=torch.float64),
                               torch.zeros(3, K, dtype=torch.long), torch.ones(3, K,
                                                                             dtype=torch.float64))
        raise AssertionError("mismatch not detected")
    except ValueError as exc:
        assert "but rank" in str(exc)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    os._exit(0)
