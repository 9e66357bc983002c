"""Kernel-level breakdown of one layer step (``python -m groupmoe.bench.profile``)."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .layer import LayerProblem
from .shapes import SHAPES, SMOKE_SHAPE


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=[*SHAPES, "smoke"])
    p.add_argument("--impl", default="groupmoe")
    p.add_argument("--mode", default="train")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMOKE_SHAPE if args.shape == "smoke" else SHAPES[args.shape]
    prob = LayerProblem(shape, args.tokens, args.mode, device, torch.bfloat16)
    step = prob.step_fn(args.impl)
    for i in range(3):
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(5):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
