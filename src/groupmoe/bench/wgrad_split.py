"""Backward split for zero-bubble schedules: time of the dX half (weight gradients deferred to
the WeightGradStore) and of the deferred dW half, against the full backward, per shape.

``python -m groupmoe.bench.wgrad_split --out wgrad.json`` (``--smoke`` on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ..ops import build_routing, expert_mlp
from ..parallel import WEIGHT_GRAD_STORE
from .layer import LayerProblem, environment
from .shapes import SHAPES, SMOKE_SHAPE
from .timing import start_timer


def split_times(prob: LayerProblem, repeat: int) -> dict[str, float]:
    """Median ms of full backward, dX-only backward and the popped dW work."""
    full, dx, dw = [], [], []
    for it in range(repeat + 2):
        x, ids, gates, dout, _ = prob.inputs[it % len(prob.inputs)]
        for split in (False, True):
            prob.clear_grads()
            if split:  # deferral is decided in forward
                WEIGHT_GRAD_STORE.enable()
            out = expert_mlp(x, build_routing(ids, prob.shape.experts), gates, prob.w1, prob.w2,
                             prob.b1, prob.b2, prob.act)
            if prob.device.type == "cuda":
                torch.cuda.synchronize()
            stop = start_timer(prob.device)
            out.backward(dout)
            t_bwd = stop()
            if split:
                WEIGHT_GRAD_STORE.flush()
                WEIGHT_GRAD_STORE.disable()
                stop = start_timer(prob.device)
                WEIGHT_GRAD_STORE.pop()
                t_w = stop()
            if it >= 2:  # warm-up
                (dx if split else full).append(t_bwd)
                if split:
                    dw.append(t_w)
    return {"full_bwd_ms": statistics.median(full), "dx_ms": statistics.median(dx),
            "dw_ms": statistics.median(dw)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [SMOKE_SHAPE] if args.smoke else list(SHAPES.values())
    tokens = 64 if args.smoke else args.tokens
    rows = []
    print("| shape | full backward ms | dX half ms | dW half ms | dW / full |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        prob = LayerProblem(shape, tokens, "train", device, torch.bfloat16)
        r = {"shape": shape.name, "tokens": tokens, **split_times(prob, args.repeat)}
        rows.append(r)
        print(f"| {shape.name} | {r['full_bwd_ms']:.2f} | {r['dx_ms']:.2f} | {r['dw_ms']:.2f} | "
              f"{r['dw_ms'] / r['full_bwd_ms']:.0%} |")
        del prob
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": environment(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
