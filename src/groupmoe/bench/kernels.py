"""Triton expert kernels against their torch equivalents on the DESIGN.md shapes (CUDA only).

    python -m groupmoe.bench.kernels --out kernels.json [--tokens 8192] [--shapes qwen3-30b-a3b]

Per shape (bf16, random routing): each kernel and its torch equivalent, then the whole expert
MLP forward and forward+backward with ``backend="torch"`` vs ``"triton"`` (whose backward runs
the fused kernels of :mod:`groupmoe.kernels.grouped_bwd`; the ``bwd:`` rows time them one by
one). Times are CUDA-event
medians over ``--iters`` runs after warm-up (which includes autotuning), with L2 flushed before
each run; beside each, the rel-norm error of the Triton result against torch's.
``--no-autotune`` uses one fixed tile config (fast start). The JSON is rewritten after every
shape, so a cut-off run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

SHAPES = {  # name: (H, I, E, k, activation, biases)
    "qwen3-30b-a3b": (2048, 768, 128, 8, "swiglu", False),
    "olmoe-1b-7b": (2048, 1024, 64, 8, "swiglu", False),
    "gpt-oss-20b": (2880, 2880, 32, 4, "gptoss", True),
    "mixtral-8x7b": (4096, 14336, 8, 2, "swiglu", False),
}


def _timer(iters: int, flush: torch.Tensor):
    if not flush.is_cuda:  # smoke runs on CPU (TRITON_INTERPRET=1): wall clock, one run
        def wall(fn) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return wall

    def bench(fn) -> float:
        for _ in range(3):  # warm-up; the first call autotunes
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    return bench


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_shape(name: str, tokens: int, bench, dev: str = "cuda", shrink: int = 1) -> list[dict]:
    from ..kernels import grouped_bwd
    from ..kernels.experts import input_grad_rows, sum_slots
    from ..kernels.grouped import combine_rows, gather_grouped_mm, gather_grouped_mm_act
    from ..kernels.grouped_bwd import down_dx_act, grouped_wgrad
    from ..ops import build_routing, expert_mlp, gather_sum, get_activation, grouped_mm
    from ..ops.activations import scaled_backward
    from ..ops.grouped_gemm import grouped_wgrad_in_layout

    h_dim, inter, e, k, act_name, biases = SHAPES[name]
    h_dim, inter, dt = h_dim // shrink, inter // shrink, torch.bfloat16
    x = torch.randn(tokens, h_dim, device=dev, dtype=dt)
    ids = torch.rand(tokens, e, device=dev).topk(k, dim=1).indices
    gates = torch.randn(tokens, k, device=dev).softmax(-1)
    w1 = (torch.randn(e, h_dim, 2 * inter, device=dev, dtype=dt) / h_dim ** 0.5)
    w2 = (torch.randn(e, inter, h_dim, device=dev, dtype=dt) / inter ** 0.5)
    b1 = torch.randn(e, 2 * inter, device=dev, dtype=dt) * 0.1 if biases else None
    b2 = torch.randn(e, h_dim, device=dev, dtype=dt) * 0.1 if biases else None
    r = build_routing(ids, e)
    n = r.num_rows
    ti, offs, ei = r.token_index, r.offsets, r.expert_index
    g = gates.reshape(-1).index_select(0, r.order)
    act = get_activation(act_name)
    extra = {"alpha": act.alpha, "limit": act.gate_limit} if act_name == "gptoss" else {}
    rows = []

    def row(kernel, flops, torch_fn, triton_fn, compare=None, tuned=None):
        try:
            ref, got = torch_fn(), triton_fn()
        except Exception as exc:  # report and go on: one failure must not cost the run
            rows.append({"shape": name, "kernel": kernel, "error": repr(exc)})
            print(f"{name:14s} {kernel:34s} FAILED: {exc!r}", flush=True)
            return
        err = _rel(*(compare(got, ref) if compare else (got, ref)))
        t_torch, t_triton = bench(torch_fn), bench(triton_fn)
        rec = {"shape": name, "kernel": kernel, "torch_ms": t_torch, "triton_ms": t_triton,
               "speedup": t_torch / t_triton, "rel_err": err,
               "triton_tflops": flops / t_triton / 1e9 if flops else None}
        if getattr(tuned, "best_config", None) is not None:  # the tile the autotuner picked
            rec["config"] = str(tuned.best_config)
        rows.append(rec)
        print(f"{name:14s} {kernel:34s} torch {t_torch:8.3f} ms  triton {t_triton:8.3f} ms  "
              f"x{rec['speedup']:5.2f}  err {err:.1e}"
              + (f"  {rec['triton_tflops']:6.1f} TFLOP/s" if flops else "")
              + (f"  [{rec['config']}]" if "config" in rec else ""), flush=True)

    gemm1 = 2 * n * h_dim * 2 * inter
    gemm2 = 2 * n * inter * h_dim
    row("gate_up gemm (gather)", gemm1,
        lambda: grouped_mm(x.index_select(0, ti), w1, offs),
        lambda: gather_grouped_mm(x, ti, w1, offs))
    w1t = w1.transpose(-1, -2).contiguous().transpose(-1, -2)
    row("gate_up gemm, W^T layout", gemm1,
        lambda: grouped_mm(x.index_select(0, ti), w1t, offs),
        lambda: gather_grouped_mm(x, ti, w1t, offs))

    def torch_act():
        hh = grouped_mm(x.index_select(0, ti), w1, offs)
        if b1 is not None:
            hh += b1.index_select(0, ei)
        return hh, act(hh) * g.to(dt).unsqueeze(1)

    row(f"gate_up+{act_name}+g", gemm1, torch_act,
        lambda: gather_grouped_mm_act(x, ti, w1, offs, act_name, bias=b1, row_scale=g, **extra),
        compare=lambda got, ref: (got[1], ref[1]))
    a_scaled = torch_act()[1]

    def torch_down():
        y = grouped_mm(a_scaled, w2, offs)
        if b2 is not None:
            y += g.to(dt).unsqueeze(1) * b2.index_select(0, ei)
        return y

    row("down gemm" + (" +g*b" if biases else ""), gemm2, torch_down,
        lambda: gather_grouped_mm(a_scaled, None, w2, offs, bias=b2,
                                  bias_scale=g if b2 is not None else None))
    y = torch_down()
    row("combine (gather_sum)", None, lambda: gather_sum(y, r, dt),
        lambda: combine_rows(y, k, r.inverse, dt))

    # backward pieces: torch's path (index_select + grouped_mm + the elementwise kernels)
    # against the fused kernels that read dy / x rows through the routing index
    dout = torch.randn(tokens, h_dim, device=dev, dtype=dt)
    h_saved = torch_act()[0]

    def torch_dx_act():
        da = grouped_mm(dout.index_select(0, ti), w2.transpose(-1, -2), offs)
        return scaled_backward(act, h_saved, g, da, True, True)

    row(f"bwd: down dX+{act_name}' (gather dy)", gemm2, torch_dx_act,
        lambda: down_dx_act(dout, ti, w2, offs, h_saved, g, act, want_a_scaled=True,
                            want_dg=True),
        compare=lambda got, ref: (got[0], ref[0]), tuned=grouped_bwd._down_dx_act_tuned)
    w2t = w2.transpose(-1, -2)
    # the same with the plain gather GEMM (big tiles) and the separate act-backward kernel:
    # does fusing the epilogue (small tiles, see grouped_bwd._dx_configs) pay?
    row(f"bwd: down dX (gather dy), then {act_name}'", gemm2, torch_dx_act,
        lambda: scaled_backward(act, h_saved, g, gather_grouped_mm(dout, ti, w2t, offs), True,
                                True),
        compare=lambda got, ref: (got[0], ref[0]))
    dh = torch_dx_act()[0]
    for label, tr in (("", False), (", W^T layout", True)):
        row(f"bwd: dW gate_up (gather x){label}", gemm1,
            lambda tr=tr: grouped_wgrad_in_layout(x.index_select(0, ti), dh, offs, tr),
            lambda tr=tr: grouped_wgrad(x, ti, dh, None, offs, transposed=tr),
            tuned=grouped_bwd._wgrad_tuned)
    row("bwd: dW down (gather dy)", gemm2,
        lambda: grouped_wgrad_in_layout(a_scaled, dout.index_select(0, ti), offs, False),
        lambda: grouped_wgrad(a_scaled, None, dout, ti, offs),
        tuned=grouped_bwd._wgrad_tuned)
    row("bwd: dX gate_up + combine", gemm1,
        lambda: gather_sum(grouped_mm(dh, w1.transpose(-1, -2), offs), r, dt),
        lambda: sum_slots(input_grad_rows(dh, w1, r), r, dt))

    leaves = [t.requires_grad_() for t in (x, gates, w1, w2, b1, b2) if t is not None]

    def mlp(backend):
        return expert_mlp(x, r, gates, w1, w2, b1, b2, act_name, backend=backend)

    fwd = gemm1 + gemm2
    with torch.no_grad():
        row("expert_mlp forward", fwd, lambda: mlp("torch"), lambda: mlp("triton"))
    up = torch.randn(tokens, h_dim, device=dev, dtype=dt)

    def train(backend):
        def step():
            for t in leaves:
                t.grad = None
            out = mlp(backend)
            out.backward(up)
            return out.detach()
        return step

    row("expert_mlp fwd+bwd", 3 * fwd, train("torch"), train("triton"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT_JSON", "kernels.json"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-autotune", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script itself: shapes / 64, needs TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.no_autotune:
        os.environ["GROUPMOE_TRITON_AUTOTUNE"] = "0"
    dev, shrink = ("cpu", 64) if args.smoke else ("cuda", 1)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("groupmoe.bench.kernels needs a CUDA device (or --smoke)")
    import triton

    torch.manual_seed(0)
    flush = torch.empty(256 * 2**20 if dev == "cuda" else 1, dtype=torch.int8, device=dev)
    bench = _timer(args.iters, flush)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "tokens": args.tokens, "iters": args.iters, "dtype": "bfloat16",
            "autotune": not args.no_autotune}
    result = {"meta": meta, "rows": []}
    t0 = time.time()
    for name in args.shapes:
        result["rows"] += bench_shape(name, args.tokens, bench, dev, shrink)
        if dev == "cuda":
            torch.cuda.empty_cache()
        result["meta"]["elapsed_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
