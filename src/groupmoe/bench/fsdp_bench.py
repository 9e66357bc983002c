"""FSDP2 over real-sized transformers decoder layers patched with groupmoe: training-step
tokens/s and peak memory per GPU on 1..N GPUs of one host (NCCL), the same per-GPU batch.

``python -m groupmoe.bench.fsdp_bench --gpus 1 2 --out fsdp.json`` spawns one process per GPU
for each count. One GPU runs the model unsharded (the baseline); more run ``fully_shard`` on
every decoder layer and the root. The step is forward + backward of the decoder layers on
``inputs_embeds`` (as :mod:`groupmoe.bench.hf_e2e`), gradients reduce-scattered by FSDP.
``--compile`` compiles each decoder layer too. ``--smoke`` runs tiny configs on CPU (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..integrations.transformers import use_experts_implementation
from .hf_e2e import REAL, build, set_compiled
from .layer import environment
from .timing import median_ms, sync


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        if args.sm_carveout:  # cuBLAS/CUTLASS GEMMs leave SMs to the concurrent collectives
            torch._C._set_sm_carveout_experimental(args.sm_carveout)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(args.model, args.layers, args.smoke, device, dtype)
    use_experts_implementation(model, args.impl)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=not args.keep_unsharded)
        fully_shard(model, mesh=mesh)
    set_compiled(model, args.compile)
    g = torch.Generator(device=device).manual_seed(1 + rank)
    embeds = [torch.randn(args.batch, args.seq, model.config.hidden_size, device=device,
                          dtype=dtype, generator=g).requires_grad_(True) for _ in range(2)]

    def step(it):
        model.zero_grad(set_to_none=True)
        out = model(inputs_embeds=embeds[it % 2]).last_hidden_state
        out.float().pow(2).mean().backward()

    step(0)  # compile, allocator warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, warmup=2, repeat=args.repeat)
    # everything this GPU holds at its peak: (sharded) weights, gradients, activations
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    if args.profile:  # every rank steps (collectives), rank 0 reports
        _profile(step, device, report=rank == 0)
    times = [None] * world
    dist.all_gather_object(times, (ms, peak))
    if rank == 0:
        tokens = world * args.batch * args.seq
        slowest = max(t for t, _ in times)
        results.put({"model": args.model, "impl": args.impl, "layers": args.layers,
                     "gpus": world, "compiled": args.compile,
                     "reshard_after_forward": not args.keep_unsharded,
                     "sm_carveout": args.sm_carveout, "tokens_per_gpu":
                     args.batch * args.seq, "ms": slowest, "tokens_per_s": tokens / slowest * 1e3,
                     "peak_mib_per_gpu": max((p for _, p in times if p is not None),
                                             default=None)})
    dist.barrier()
    dist.destroy_process_group()


def _profile(step, device, report: bool) -> None:
    """Where one step waits: host syncs and device-to-host copies (they stop the CPU from
    running ahead, so FSDP cannot issue the next all-gather early), NCCL kernel time against
    compute kernel time."""
    from torch.profiler import ProfilerActivity, profile

    from .profile import kernel_ms

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(0)
        sync(device)
    if not report:
        return
    events = prof.key_averages()
    waits = [e for e in events if any(k in e.key for k in ("Synchronize", "Memcpy", "item",
                                                           "_local_scalar_dense"))]
    for e in waits:
        print(f"profile: {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms CPU")
    nccl = kernel_ms([e for e in events if "nccl" in e.key.lower()])
    busy = kernel_ms(events)
    print(f"profile: kernels {busy:.1f} ms, of which NCCL {nccl:.1f} ms", flush=True)


def run(world: int, args) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), args, results), nprocs=world,
                       join=True, start_method="spawn")
    return results.get()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen3-30b-a3b", choices=list(REAL))
    p.add_argument("--impl", default="groupmoe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--keep-unsharded", action="store_true",
                   help="reshard_after_forward=False: no second all-gather in backward, the "
                        "unsharded layers held from forward to backward")
    p.add_argument("--sm-carveout", type=int, default=0,
                   help="SMs the GEMM libraries leave free for NCCL's kernels (torch's "
                        "experimental carveout; persistent GEMMs otherwise wait for them)")
    p.add_argument("--profile", action="store_true",
                   help="also print rank 0's host syncs and NCCL vs compute kernel time")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.repeat, args.layers = 1, 16, 1, 2
    rows = []
    for world in args.gpus:
        row = run(world, args)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["tokens_per_s"]
    print("| GPUs | compiled | ms/step | tokens/s | vs first | per-GPU efficiency | "
          "peak MiB/GPU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_mib_per_gpu"] is None else f"{r['peak_mib_per_gpu']:.0f}"
        speed = r["tokens_per_s"] / base
        print(f"| {r['gpus']} | {r['compiled']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{speed:.2f}x | {speed * rows[0]['gpus'] / r['gpus']:.2f} | {peak} |")
    if args.out:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with open(args.out, "w") as fh:
            json.dump({"env": environment(device), "rows": rows}, fh, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
