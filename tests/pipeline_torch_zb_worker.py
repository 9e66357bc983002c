"""torch.distributed.pipelining's zero-bubble schedules (interleaved and ZBV) over gloo with
groupmoe stages whose weight gradients go through the WeightGradStore (run by
test_wgrad_store.py)."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, schedules

from dist_helpers import assert_grads_match, finish
from groupmoe import MoEBlock
from groupmoe.parallel import WEIGHT_GRAD_STORE, defer_linear_weight_grads

H, STAGES, MICRO, B, S = 16, 4, 4, 8, 3


class Stage(nn.Module):
    """Norm (its grads stay in the input step) -> MoE block -> a deferred dense projection."""

    def __init__(self, i):
        super().__init__()
        kw = (dict(router="topk_softmax", activation="gptoss", expert_bias=True) if i % 2
              else dict(shared_intermediate_size=12))
        self.norm = nn.LayerNorm(H, dtype=torch.float64)
        self.moe = MoEBlock(H, 8, 4, 2, dtype=torch.float64, **kw)
        self.proj = defer_linear_weight_grads(nn.Linear(H, H, dtype=torch.float64))

    def forward(self, x):
        out, _ = self.moe(self.norm(x))
        return x + self.proj(out)


def build():
    torch.manual_seed(0)
    return [Stage(i) for i in range(STAGES)]


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, S, H, generator=g, dtype=torch.float64),
            torch.randn(B, S, H, generator=g, dtype=torch.float64))


def loss_fn(out, target):
    return (out - target).pow(2).sum()


def run_schedule(rank, name):
    """One ``schedule.step`` of ``name`` over fresh stages; every gradient is checked against
    plain backward of the whole model in this process."""
    stages_all = build()
    placement = {"ScheduleInterleavedZeroBubble": ([0, 2], [1, 3]),  # a loop
                 "ScheduleZBVZeroBubble": ([0, 3], [1, 2])}  # a "V"
    mine = placement[name][rank]
    mb = torch.zeros(B // MICRO, S, H, dtype=torch.float64, requires_grad=True)
    queued = []

    def dw_builder():  # the store's builder, recording that backward deferred work to it
        queued.append(WEIGHT_GRAD_STORE.queued())
        return WEIGHT_GRAD_STORE.dw_builder()

    stages = [PipelineStage(stages_all[i], i, STAGES, torch.device("cpu"), input_args=(mb,),
                            output_args=(mb,), dw_builder=dw_builder)
              for i in mine]
    schedule = getattr(schedules, name)(stages, n_microbatches=MICRO, loss_fn=loss_fn,
                                        scale_grads=False)  # sum over micro-batches
    x, target = data()
    args = (x,) if 0 in mine else ()
    kwargs = {"target": target} if STAGES - 1 in mine else {}
    with WEIGHT_GRAD_STORE:
        schedule.step(*args, **kwargs)
    assert len(queued) == len(mine) * MICRO and all(n > 0 for n in queued), (name, queued)
    assert WEIGHT_GRAD_STORE.pending() == 0 and WEIGHT_GRAD_STORE.queued() == 0
    ref = build()
    h = x
    for st in ref:
        h = st(h)
    loss_fn(h, target).backward()
    for i in mine:
        ref_grads = {n: p.grad for n, p in ref[i].named_parameters()}
        assert_grads_match(stages_all[i].named_parameters(), ref_grads, 1e-10, (name, i))
    dist.barrier()


def main(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    for name in ("ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble"):
        run_schedule(rank, name)
    finish(rank)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
    os._exit(0)
