"""All-gather and reduce-scatter bandwidth between the GPUs of one host (NCCL), at the size of
one FSDP2-sharded Qwen3-30B-A3B decoder layer: what FSDP2's communication can reach there.
``torchrun --nproc-per-node 2 -m groupmoe.bench.nccl_bw``."""

import os

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
numel = 620_000_000 // world  # one layer's bf16 parameters, sharded
shard = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
full = torch.empty(numel * world, device="cuda", dtype=torch.bfloat16)
for name, fn in (("all_gather", lambda: dist.all_gather_into_tensor(full, shard)),
                 ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full))):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / 10
    bus = full.numel() * 2 * (world - 1) / world / ms / 1e6  # GB/s, NCCL's bus bandwidth
    if rank == 0:
        print(f"{name}: {full.numel() * 2 / 2**20:.0f} MiB in {ms:.2f} ms, bus {bus:.0f} GB/s")
dist.destroy_process_group()
