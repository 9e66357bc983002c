"""Kernel-level breakdown of one layer step (``python -m groupmoe.bench.profile``).

Besides the profiler's table, on CUDA it prints where a step's time goes: the sum of its
kernels' durations (GPU busy), its time timed alone from an idle GPU (how ``groupmoe bench``
times it: launch latency the GPU cannot hide is included) and back-to-back (the CPU runs
ahead, as over the layers of a model).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from .layer import LayerProblem
from .shapes import SHAPES, SMOKE_SHAPE
from .timing import median_ms, start_timer, sync


def back_to_back_ms(step, device, steps: int = 10, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of ``steps`` consecutive steps, per step."""
    runs = []
    for r in range(repeat):
        sync(device)
        stop = start_timer(device)
        for i in range(steps):
            step(r * steps + i)
        runs.append(stop() / steps)
    return statistics.median(runs)


def kernel_ms(table) -> float:
    """Total duration of the GPU kernels (and copies) in a profiler's ``key_averages()``, ms."""
    return sum(e.self_device_time_total for e in table
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=[*SHAPES, "smoke"])
    p.add_argument("--impls", nargs="+", default=["groupmoe"])
    p.add_argument("--mode", default="train")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMOKE_SHAPE if args.shape == "smoke" else SHAPES[args.shape]
    prob = LayerProblem(shape, args.tokens, args.mode, device, torch.bfloat16)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    steps = 5
    for impl in args.impls:
        step = prob.step_fn(impl)
        for i in range(3):
            step(i)
        with profile(activities=acts) as prof:
            for i in range(steps):
                step(i)
            sync(device)
        table = prof.key_averages()
        print(f"--- {shape.name} {args.mode} {impl}")
        print(table.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        if device.type == "cuda":
            kernels_ms = kernel_ms(table) / steps
            alone = median_ms(step, device, repeat=20)
            chained = back_to_back_ms(step, device)
            print(f"per step: kernels {kernels_ms:.2f} ms (GPU busy), timed alone {alone:.2f} ms,"
                  f" back-to-back {chained:.2f} ms")


if __name__ == "__main__":
    main()
