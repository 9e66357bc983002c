"""Expert parallelism on GPUs: NCCL correctness and qwen3-30b-a3b layer throughput, EP=N vs 1.

Run on a host with N >= 2 GPUs::

    torchrun --nproc-per-node 2 -m groupmoe.bench.ep_bench --out ep.json

1. Correctness: every rank builds the same global problem; the EP result of its token slice
   (uneven token counts, a skewed load that leaves one rank's experts empty) is compared with
   the single-GPU result on the whole batch: fp64 against the per-expert oracle, fp32 (torch
   grouped_mm kernels) against the single-GPU groupmoe path. Output and every gradient.
2. Throughput of the qwen3-30b-a3b expert layer (H=2048, I=768, E=128, k=8, bf16, T tokens per
   rank, uniform random routing), fwd+bwd with expert weights trained: one GPU with all experts
   on T tokens, then EP over N GPUs (E/N experts each) on N*T tokens. CUDA events, medians;
   the EP step time is the slowest rank's median.

``--dry-run`` runs the same flow on CPU over gloo with a tiny shape (a smoke test of the
script, e.g. ``torchrun --nproc-per-node 2 -m groupmoe.bench.ep_bench --dry-run``).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from groupmoe.nn import GroupedExperts  # noqa: E402
from groupmoe.ops import set_validation  # noqa: E402
from groupmoe.parallel import ExpertParallel, local_expert_range  # noqa: E402

QWEN3_30B_A3B = (2048, 768, 128, 8)  # H, I, E, k
DRY_RUN_SHAPE = (64, 32, 8, 2)
DEV = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_problem(tokens: int, h: int, i: int, e: int, k: int, dtype, skewed: bool, seed: int):
    """Global inputs, identical on every rank (same seed, generated on the device)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    live = e // 2 if skewed else e  # skewed: experts [E/2, E) get no tokens
    scores = torch.rand(tokens, live, device=DEV, generator=g)
    ids = scores.topk(k, dim=1).indices
    gates = torch.softmax(torch.randn(tokens, k, device=DEV, generator=g), -1).to(dtype)
    x = torch.randn(tokens, h, device=DEV, generator=g).to(dtype)
    torch.manual_seed(seed)
    experts = GroupedExperts(h, i, e, device=DEV, dtype=dtype)
    return x, ids, gates, experts


def fwd_bwd(module, x, ids, gates, dout):
    x = x.detach().requires_grad_(True)
    gates = gates.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    out = module(x, ids, gates)
    out.backward(dout)
    return out.detach(), x.grad, gates.grad, {n: p.grad for n, p in module.named_parameters()}


def check_correctness(rank: int, world: int, dtype, oracle: str, dry_run: bool) -> dict:
    tokens = [(32 if dry_run else 512) + 96 * r for r in range(world)]  # uneven per rank
    h, i, e, k = (32, 16, 4 * world, 2) if dry_run else (256, 128, 8 * world, 4)
    result = {}
    for skewed in (False, True):
        x, ids, gates, full = make_problem(sum(tokens), h, i, e, k, dtype, skewed, seed=11)
        dout = torch.randn_like(x)
        if oracle == "loop":
            full.impl = "loop"
        ref = fwd_bwd(full, x, ids, gates, dout)
        full.impl = "groupmoe"
        ep = ExpertParallel.from_experts(full)
        lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
        out, dx, dg, dw = fwd_bwd(ep, x[lo:hi], ids[lo:hi], gates[lo:hi], dout[lo:hi])
        shard = local_expert_range(e, rank, world)
        errs = {"out": rel_err(out, ref[0][lo:hi]), "dx": rel_err(dx, ref[1][lo:hi]),
                "dgates": rel_err(dg, ref[2][lo:hi])}
        for name, grad in dw.items():
            want = ref[3][name][shard.start:shard.stop]
            got = grad if grad is not None else torch.zeros_like(want)
            errs["d" + name] = 0.0 if want.abs().max() == 0 and got.abs().max() == 0 \
                else rel_err(got, want)
        result["skewed" if skewed else "uniform"] = errs
    return result


def time_ms(step, iters: int, warmup: int) -> list[float]:
    """Per-iteration milliseconds: CUDA events on GPU, the wall clock on CPU (dry run)."""
    times = []
    cuda = DEV.type == "cuda"
    for n in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        if cuda:
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3
        if n >= warmup:
            times.append(ms)
    return times


def throughput(rank: int, world: int, tokens: int, iters: int, warmup: int,
               shape: tuple[int, int, int, int], overlap: tuple[int, ...] = (1,)) -> dict:
    """One GPU on ``tokens``, then EP over ``world`` ranks on ``world * tokens``, once per
    ``overlap_chunks`` value in ``overlap`` (rows ``ep{world}`` and ``ep{world}-overlap{c}``);
    efficiencies against the one-GPU row."""
    h, i, e, k = shape
    cuda = DEV.type == "cuda"
    set_validation(False)  # no data checks (one host sync each); EP keeps its own count sync
    x, ids, gates, full = make_problem(tokens * world, h, i, e, k, torch.bfloat16, False,
                                       seed=3)
    lo, hi = rank * tokens, (rank + 1) * tokens
    x, ids, gates = x[lo:hi].contiguous(), ids[lo:hi].contiguous(), gates[lo:hi].contiguous()
    dout = torch.randn_like(x)
    res = {}
    variants = [("1gpu", None)] + [(ep_name(world, c), c) for c in overlap]
    for n, (name, chunks) in enumerate(variants):
        module = full if chunks is None else ExpertParallel.from_experts(
            full, overlap_chunks=chunks)
        if n == len(variants) - 1:
            del full
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        fwd = time_ms(lambda m=module: m(x, ids, gates), iters, warmup)
        train = time_ms(lambda m=module: fwd_bwd(m, x, ids, gates, dout), iters, warmup)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0
        med = torch.tensor([statistics.median(fwd), statistics.median(train), peak],
                           device=DEV)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        gpus = 1 if name == "1gpu" else world
        fwd_ms, train_ms, peak_mib = med.tolist()
        res[name] = {"gpus": gpus, "tokens": tokens * gpus, "fwd_ms": fwd_ms,
                     "train_ms": train_ms, "peak_extra_mib": peak_mib,
                     "train_tokens_per_s": tokens * gpus / train_ms * 1e3,
                     "train_tflops_per_gpu": 2 * tokens * k * 3 * h * i * 3 / train_ms / 1e9}
        del module
    one = res["1gpu"]
    for name, _ in variants[1:]:
        res[name]["per_gpu_efficiency"] = \
            res[name]["train_tokens_per_s"] / world / one["train_tokens_per_s"]
    res["per_gpu_efficiency"] = res[variants[1][0]]["per_gpu_efficiency"]
    return res


def ep_name(world: int, chunks: int) -> str:
    return f"ep{world}" if chunks == 1 else f"ep{world}-overlap{chunks}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="JSON result path")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="CPU + gloo, tiny shapes")
    p.add_argument("--overlap-chunks", type=int, nargs="+", default=[1],
                   help="ExpertParallel(overlap_chunks=...) values to time, one row each")
    args = p.parse_args()
    global DEV
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.dry_run:
        DEV = torch.device("cpu")
        dist.init_process_group("gloo")
        shape, tokens, name = DRY_RUN_SHAPE, min(args.tokens, 64), "cpu (dry run)"
    else:
        DEV = torch.device("cuda", local)
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=DEV)
        torch.backends.cuda.matmul.allow_tf32 = False
        shape, tokens, name = QWEN3_30B_A3B, args.tokens, torch.cuda.get_device_name()
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "device": name, "torch": torch.__version__, "world": world,
        "shape_HIEk": shape, "tokens_per_rank": tokens,
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE",
                                           "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "correctness": {"fp64_vs_oracle": check_correctness(rank, world, torch.float64, "loop",
                                                            args.dry_run),
                        "fp32_vs_1gpu": check_correctness(rank, world, torch.float32,
                                                          "groupmoe", args.dry_run)},
    }
    worst = torch.tensor([max(v for case in result["correctness"]["fp64_vs_oracle"].values()
                              for v in case.values()),
                          max(v for case in result["correctness"]["fp32_vs_1gpu"].values()
                              for v in case.values())], device=DEV)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    fp64_err, fp32_err = worst.tolist()
    result["correctness"]["worst_fp64"], result["correctness"]["worst_fp32"] = fp64_err, fp32_err
    result["correctness"]["pass"] = fp64_err < 1e-10 and fp32_err < 1e-4
    result["throughput"] = throughput(rank, world, tokens, args.iters, args.warmup, shape,
                                      tuple(args.overlap_chunks))
    if rank == 0:
        c, t = result["correctness"], result["throughput"]
        print(f"{result['device']} x{world}, torch {result['torch']}")
        print(f"correctness (all ranks, out + all grads): worst rel err fp64 vs oracle "
              f"{fp64_err:.2e}, fp32 vs 1 GPU {fp32_err:.2e} -> {'PASS' if c['pass'] else 'FAIL'}")
        print(f"expert layer (H, I, E, k) = {shape}, bf16, train (fwd+bwd), tokens/rank = "
              f"{tokens}")
        print(f"{'config':13} {'tokens':>7} {'fwd ms':>8} {'train ms':>9} {'tok/s':>10} "
              f"{'TFLOP/s/gpu':>11} {'peak MiB':>9}")
        for name in ["1gpu"] + [ep_name(world, c) for c in args.overlap_chunks]:
            r = t[name]
            eff = f" efficiency {r['per_gpu_efficiency']:.2f}" if name != "1gpu" else ""
            print(f"{name:13} {r['tokens']:7d} {r['fwd_ms']:8.2f} {r['train_ms']:9.2f} "
                  f"{r['train_tokens_per_s']:10.0f} {r['train_tflops_per_gpu']:11.1f} "
                  f"{r['peak_extra_mib']:9.0f}{eff}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
