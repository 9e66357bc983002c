"""Two-stage pipeline on gloo with a zero-bubble-style schedule (backward split into dX now,
dW later via the WeightGradStore); run by test_wgrad_store.py, one process per stage."""

import os
import sys

import torch
import torch.distributed as dist

from dist_helpers import assert_grads_match, finish
from groupmoe import MoEBlock
from groupmoe.parallel import WEIGHT_GRAD_STORE

H, MICRO = 16, 3


def build():
    torch.manual_seed(0)
    return [MoEBlock(H, 8, 4, 2, dtype=torch.float64), MoEBlock(H, 8, 4, 2, dtype=torch.float64,
                                                               router="topk_softmax",
                                                               activation="gptoss",
                                                               expert_bias=True)]


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, H, generator=g, dtype=torch.float64) for _ in range(MICRO)]


def reference(stage):
    blocks = build()
    for x in batches():
        y, _ = blocks[0](x)
        z, _ = blocks[1](y)
        z.pow(2).sum().backward()
    return {n: p.grad for n, p in blocks[stage].named_parameters()}


def main(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    block = build()[rank]
    acts = []
    # the store decides deferral in forward: enable it before the forwards
    WEIGHT_GRAD_STORE.enable()
    # forward of every micro-batch (stage 0 sends activations downstream)
    for x in batches():
        if rank == 0:
            y, _ = block(x)
            dist.send(y.detach(), dst=1)
            acts.append(y)
        else:
            y = torch.empty(5, H, dtype=torch.float64)
            dist.recv(y, src=0)
            y.requires_grad_(True)
            z, _ = block(y)
            acts.append((y, z))
    # B steps: input gradients only, weight gradients queued per micro-batch
    for act in acts:
        if rank == 1:
            y, z = act
            z.pow(2).sum().backward()
            dist.send(y.grad, dst=0)
        else:
            dy = torch.empty(5, H, dtype=torch.float64)
            dist.recv(dy, src=1)
            act.backward(dy)
        WEIGHT_GRAD_STORE.flush()
    WEIGHT_GRAD_STORE.disable()
    deferred = [n for n, p in block.named_parameters() if "bias" not in n]
    assert deferred and all(dict(block.named_parameters())[n].grad is None for n in deferred)
    # W steps: fill the bubble with the deferred weight gradients
    while WEIGHT_GRAD_STORE.pending():
        WEIGHT_GRAD_STORE.pop()
    assert_grads_match(block.named_parameters(), reference(rank), 1e-12, rank)
    finish(rank)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
    os._exit(0)
