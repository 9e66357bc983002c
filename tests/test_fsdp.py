"""FSDP2 (``fully_shard``), expert parallel on a ("dp", "ep") mesh, and distributed checkpoints
over groupmoe, on CPU with gloo: loss and every gradient equal to one process.

Each rank trains its own batch; the single-process reference runs every rank's batch through
the unsharded model with the loss averaged over ranks (what FSDP's gradient average gives).
One spawn per world size runs all cases (process start-up dominates the runtime).
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_helpers import finish, free_port

TOL = 1e-10  # fp64 cases
HF_TOL = 1e-5  # fp32 transformers models


class Stack(nn.Module):
    """Residual MoEBlocks: a minimal model of torchtitan's shape."""

    def __init__(self, layers=2, hidden=12, inter=8, experts=4, top_k=2, **kw):
        super().__init__()
        import groupmoe

        self.blocks = nn.ModuleList(groupmoe.MoEBlock(hidden, inter, experts, top_k,
                                                      dtype=torch.float64, **kw)
                                    for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)[0]
        return x


def _batches(world, hidden, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = [5 + 4 * r for r in range(world)]  # unequal token counts per rank
    return [(torch.randn(n, hidden, generator=g, dtype=torch.float64),
             torch.randn(n, hidden, generator=g, dtype=torch.float64)) for n in sizes]


def _reference_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum((model(x) * w).sum() for x, w in batches) / len(batches)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_grads(model, ref, tol, where, expected=None):
    expected = expected or {}
    for n, p in model.named_parameters():
        want = expected.get(n, ref[n])
        got = _full(p.grad)
        err = float((got - want).norm() / want.norm().clamp_min(1e-300))
        assert err < tol, (where, n, err)


def _moe_stack(rank, world, mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack(shared_intermediate_size=6)
    batches = _batches(world, 12)
    ref = _reference_grads(model, batches)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, w = batches[rank]
    (model(x) * w).sum().backward()
    _assert_grads(model, ref, TOL, "MoEBlock stack")


def _hf(name, seed=0):
    import groupmoe
    from test_transformers import build

    model = build(name, seed=seed)
    assert groupmoe.patch(model).patched
    return model


def _hf_model(rank, world, mesh, name, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from test_transformers import build, tokens

    model = _hf(name)
    batches = [tokens(batch=2, seq=9, seed=10 + r) for r in range(world)]
    model.zero_grad(set_to_none=True)
    losses = [model(b, labels=b).loss for b in batches]
    (sum(losses) / world).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mine = batches[rank]
    loss = model(mine, labels=mine).loss
    assert abs(float(loss - losses[rank])) < HF_TOL, (name, float(loss), float(losses[rank]))
    loss.backward()
    _assert_grads(model, ref, HF_TOL, name)
    if ckpt is None:
        return
    # a sharded patched model saves the model's own keys: they load into an unpatched,
    # unsharded model and into a patched, sharded one
    state = get_model_state_dict(model)
    dcp.save(state, checkpoint_id=ckpt)
    plain = build(name, seed=1)
    assert set(state) == set(plain.state_dict())
    loaded = plain.state_dict()
    dcp.load(loaded, checkpoint_id=ckpt)
    plain.load_state_dict(loaded)
    for (n, p), (n2, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert n == n2 and torch.equal(_full(p.detach()), q.detach()), n
    again = _hf(name, seed=2)
    for layer in again.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(again, mesh=mesh)
    state2 = get_model_state_dict(again)
    dcp.load(state2, checkpoint_id=ckpt)
    set_model_state_dict(again, state2)
    with torch.no_grad():
        assert torch.equal(again(mine).logits, model(mine).logits)


def _worker2(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _moe_stack(rank, world, mesh)
    if _has_transformers5():
        _hf_model(rank, world, mesh, "qwen3_moe", ckpt)
        _hf_model(rank, world, mesh, "gpt_oss", None)


def _worker4(rank, world, ckpt):
    """Expert parallel inside FSDP2 on a ("dp", "ep") = (2, 2) mesh, as the ExpertParallel
    docstring prescribes: experts sharded over "ep" and FSDP over "dp" with the gradient
    divided by dp * ep; everything else FSDP over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from groupmoe.parallel import ExpertParallel, shard_expert_tensor

    dp, ep = 2, 2
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    flat = init_device_mesh("cpu", (world,))
    ep_rank = mesh.get_local_rank("ep")
    for chunks in (1, 2):  # unpipelined, and the pipelined forward and backward
        torch.manual_seed(0)
        model = Stack(experts=8)
        batches = _batches(world, 12, seed=3)
        ref = _reference_grads(model, batches)
        expected = {}
        for i, block in enumerate(model.blocks):
            block.experts = ExpertParallel.from_experts(block.experts, mesh, "ep",
                                                        overlap_chunks=chunks)
            for name, _ in block.experts.named_parameters():
                full = ref[f"blocks.{i}.experts.{name}"]
                expected[f"blocks.{i}.experts.{name}"] = shard_expert_tensor(full, ep_rank, ep)
            fully_shard(block.experts, mesh=mesh["dp"])
            block.experts.set_gradient_divide_factor(dp * ep)
        fully_shard(model, mesh=flat)
        x, w = batches[rank]
        (model(x) * w).sum().backward()
        _assert_grads(model, ref, TOL, f"EP x FSDP2, {chunks} chunk(s)", expected)


def _has_transformers5():
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5


def _entry(rank, world, port, ckpt):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    (_worker2 if world == 2 else _worker4)(rank, world, ckpt)
    finish(rank)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads), as test_expert_parallel does


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_gloo(world, tmp_path):
    mp.spawn(_entry, args=(world, free_port(), str(tmp_path / "ckpt")), nprocs=world,
             join=True)
