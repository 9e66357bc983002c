"""torch.distributed.pipelining's ScheduleInterleavedZeroBubble over gloo with groupmoe
stages whose weight gradients go through the WeightGradStore (run by test_wgrad_store.py)."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleInterleavedZeroBubble

from dist_helpers import assert_grads_match, finish
from groupmoe import MoEBlock
from groupmoe.parallel import WEIGHT_GRAD_STORE

H, STAGES, MICRO, B, S = 16, 4, 4, 8, 3


class Stage(nn.Module):
    def __init__(self, i):
        super().__init__()
        kw = dict(router="topk_softmax", activation="gptoss", expert_bias=True) if i % 2 else {}
        self.moe = MoEBlock(H, 8, 4, 2, dtype=torch.float64, **kw)

    def forward(self, x):
        out, _ = self.moe(x)
        return x + out


def build():
    torch.manual_seed(0)
    return [Stage(i) for i in range(STAGES)]


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, S, H, generator=g, dtype=torch.float64),
            torch.randn(B, S, H, generator=g, dtype=torch.float64))


def loss_fn(out, target):
    return (out - target).pow(2).sum()


def main(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    stages_all = build()
    mine = [rank, rank + 2]  # interleaved: rank r holds stages r and r + 2
    mb = torch.zeros(B // MICRO, S, H, dtype=torch.float64, requires_grad=True)
    queued = []

    def dw_builder():  # the store's builder, recording that backward deferred work to it
        queued.append(WEIGHT_GRAD_STORE.queued())
        return WEIGHT_GRAD_STORE.dw_builder()

    stages = [PipelineStage(stages_all[i], i, STAGES, torch.device("cpu"), input_args=(mb,),
                            output_args=(mb,), dw_builder=dw_builder)
              for i in mine]
    schedule = ScheduleInterleavedZeroBubble(stages, n_microbatches=MICRO, loss_fn=loss_fn,
                                             scale_grads=False)  # sum over micro-batches
    x, target = data()
    with WEIGHT_GRAD_STORE:
        if rank == 0:
            schedule.step(x, target=target)
        else:
            schedule.step(target=target)
    assert len(queued) == len(mine) * MICRO and all(n > 0 for n in queued), queued
    # reference: plain backward of the whole model in this process
    ref = build()
    h = x
    for st in ref:
        h = st(h)
    loss_fn(h, target).backward()
    for i in mine:
        ref_grads = {n: p.grad for n, p in ref[i].named_parameters()}
        assert_grads_match(stages_all[i].named_parameters(), ref_grads, 1e-10, i)
    finish(rank)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
    os._exit(0)
