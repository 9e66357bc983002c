"""Expert parallelism on GPUs (NCCL): correctness against one GPU, and throughput of the
qwen3-30b-a3b layer with EP=world vs all experts on one GPU.

``torchrun --nproc-per-node 2 -m groupmoe.bench.ep_bench --out ep.json``
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ..nn import GroupedExperts  # noqa: E402
from ..ops import build_routing, expert_mlp, route  # noqa: E402
from ..parallel.expert_parallel import ExpertParallel, shard_experts  # noqa: E402
from .shapes import SHAPES  # noqa: E402
from .timing import median_ms  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    s = SHAPES[args.shape]
    torch.manual_seed(0)
    full = GroupedExperts(s.hidden, s.intermediate, s.experts, s.activation, s.bias,
                          device=dev, dtype=torch.bfloat16)
    ep = ExpertParallel(shard_experts(full, rank, world), s.experts)
    g = torch.Generator(device=dev).manual_seed(100 + rank)
    x = torch.randn(args.tokens, s.hidden, device=dev, generator=g, dtype=torch.bfloat16)
    w, ids = route(torch.randn(args.tokens, s.experts, device=dev, generator=g), s.top_k)
    x.requires_grad_(True)
    w.requires_grad_(True)
    dout = torch.randn_like(x)
    # correctness: EP output equals all experts on this GPU
    ref = expert_mlp(x, build_routing(ids, s.experts), w, full.gate_up, full.down,
                     full.gate_up_bias, full.down_bias, full.activation)
    out = ep(x, ids, w)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())

    def ep_step(_):
        x.grad = w.grad = None
        ep(x, ids, w).backward(dout)

    def one_gpu_step(_):
        x.grad = w.grad = None
        expert_mlp(x, build_routing(ids, s.experts), w, full.gate_up, full.down,
                   full.gate_up_bias, full.down_bias, full.activation).backward(dout)

    ms_ep = median_ms(ep_step, dev, warmup=3, repeat=20)
    dist.barrier()
    ms_one = median_ms(one_gpu_step, dev, warmup=3, repeat=20)
    res = {"shape": s.name, "world": world, "tokens_per_rank": args.tokens, "rel_err": err,
           "ep_ms": ms_ep, "one_gpu_ms": ms_one,
           "ep_tokens_per_s_total": world * args.tokens / ms_ep * 1e3,
           "one_gpu_tokens_per_s": args.tokens / ms_one * 1e3,
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    every = [None] * world
    dist.all_gather_object(every, res)
    if rank == 0:
        for r in every:
            print(r)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(every, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
