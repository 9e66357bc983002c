"""Peak extra memory and time of one MoE layer's forward+backward: ``naive`` against the fused
Function with ``save="h"`` and ``save="none"`` (issue 3's measurement).

``python -m groupmoe.bench.memory --out memory.json`` runs the four DESIGN.md shapes at
T=8192 and T=32768 in bf16 (about a minute on an H100) and prints a table with ratios to
``naive``, then the issue's targets at T=32768 on qwen3-30b-a3b. Peak extra memory is
``max_memory_allocated`` during one step minus what was allocated before it (inputs and
weights excluded, weight gradients included: the same for every impl). ``--smoke`` runs a
tiny shape on the CPU (times only).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from .layer import LayerProblem, environment
from .shapes import SHAPES, SMOKE_SHAPE
from .timing import median_ms, peak_extra_bytes

IMPLS = {"naive": "naive", "groupmoe save=h": "groupmoe", "groupmoe save=none":
         "groupmoe-recompute"}
TARGET = ("qwen3-30b-a3b", 32768, {"groupmoe save=none": 0.40, "groupmoe save=h": 0.60}, 1.10)


@dataclass
class MemRow:
    shape: str
    tokens: int
    mode: str
    impl: str
    peak_extra_mib: float | None  # None: not CUDA, or out of memory (see ``oom``)
    ms: float | None
    mem_vs_naive: float | None = None
    time_vs_naive: float | None = None
    oom: bool = False


def measure(shapes, token_counts, mode: str = "train", device=None, dtype=torch.bfloat16,
            repeat: int = 5, log=print) -> list[MemRow]:
    """One row per (shape, tokens, impl); an out-of-memory cell is recorded, not fatal."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[MemRow] = []
    for shape in shapes:
        for tokens in token_counts:
            cells: dict[str, MemRow] = {}
            prob = None
            try:
                prob = LayerProblem(shape, tokens, mode, device, dtype, sets=2)
            except torch.OutOfMemoryError:
                log(f"  {shape.name} T={tokens}: inputs do not fit")
            for label, impl in IMPLS.items() if prob is not None else ():
                row = MemRow(shape.name, tokens, mode, label, None, None)
                try:
                    step = prob.step_fn(impl)
                    # timing first: its warm-up takes the one-off allocations (kernel
                    # compilation, GEMM workspaces) out of the peak measured after it
                    row.ms = median_ms(step, device, warmup=2, repeat=repeat)
                    prob.clear_grads()  # the baseline holds no grads from an earlier step
                    peak = peak_extra_bytes(lambda s=step: s(0), device)
                    row.peak_extra_mib = None if peak is None else peak / 2 ** 20
                except torch.OutOfMemoryError:
                    row.oom = True
                prob.clear_grads()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                cells[label] = row
                log(f"  {shape.name:14s} T={tokens:6d} {label:19s} "
                    f"{'OOM' if row.oom else _fmt(row.peak_extra_mib, '.0f') + ' MiB'} "
                    f"{_fmt(row.ms, '.2f')} ms")
            base = cells.get("naive")
            for row in cells.values():
                if base is not None and row.peak_extra_mib and base.peak_extra_mib:
                    row.mem_vs_naive = row.peak_extra_mib / base.peak_extra_mib
                if base is not None and row.ms and base.ms:
                    row.time_vs_naive = row.ms / base.ms
                rows.append(row)
            del prob
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[MemRow]) -> str:
    lines = ["| shape | T | impl | peak extra MiB | memory / naive | ms | time / naive |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "OOM" if r.oom else _fmt(r.peak_extra_mib, ".0f")
        lines.append(f"| {r.shape} | {r.tokens} | {r.impl} | {peak} | "
                     f"{_fmt(r.mem_vs_naive, '.2f')} | {_fmt(r.ms, '.2f')} | "
                     f"{_fmt(r.time_vs_naive, '.2f')} |")
    return "\n".join(lines)


def check_targets(rows: list[MemRow]) -> list[str]:
    """Issue 3's targets: memory ratios to naive, and save=h's time within 10% of naive."""
    shape, tokens, mem_limits, time_limit = TARGET
    cell = {r.impl: r for r in rows if r.shape == shape and r.tokens == tokens}
    if not cell:
        return []
    out = []
    for impl, limit in mem_limits.items():
        r = cell.get(impl)
        if r is None or r.mem_vs_naive is None:
            out.append(f"{shape} T={tokens} {impl}: memory not measured")
            continue
        out.append(f"{shape} T={tokens} {impl}: memory {r.mem_vs_naive:.2f} of naive "
                   f"(target <= {limit:.2f}) {'ok' if r.mem_vs_naive <= limit else 'MISS'}")
    r = cell.get("groupmoe save=h")
    if r is not None and r.time_vs_naive is not None:
        out.append(f"{shape} T={tokens} groupmoe save=h: time {r.time_vs_naive:.2f} of naive "
                   f"(target <= {time_limit:.2f}) "
                   f"{'ok' if r.time_vs_naive <= time_limit else 'MISS'}")
    return out


def main(argv: list[str] | None = None) -> list[MemRow]:
    p = argparse.ArgumentParser(prog="python -m groupmoe.bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="token counts (default 8192 32768; smoke 64 128)")
    p.add_argument("--mode", default="train", choices=["train", "frozen"],
                   help="train: expert weights get gradients; frozen: only dX and dgates")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, for the tests")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke
                                          else "cpu"))
    shapes = [SMOKE_SHAPE] if args.smoke else [SHAPES[s] for s in args.shapes]
    tokens = args.tokens or ([64, 128] if args.smoke else [8192, 32768])
    env = environment(device)
    print(f"groupmoe memory bench: {env['device']}, torch {env['torch']}, {args.dtype}, "
          f"{args.mode}")
    rows = measure(shapes, tokens, args.mode, device, getattr(torch, args.dtype), args.repeat)
    print(format_table(rows))
    targets = check_targets(rows)
    for line in targets:
        print(line)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "dtype": args.dtype, "mode": args.mode, "targets": targets,
                       "rows": [asdict(r) for r in rows]}, fh, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
