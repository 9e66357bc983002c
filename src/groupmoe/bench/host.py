"""Host time of one expert layer call and of its pieces, beside the time with the GPU.

At fine-tuning token counts (a few thousand per step) a layer's kernels are short and the step
waits on the CPU issuing them: the GPU idles. This measures, per call, the host time (the CPU
returning from the call while a long GPU op keeps the queue busy, so no call waits for the
GPU) and the wall time of the same calls followed by a synchronize. ``host / wall`` near 1:
the call is host-bound; far below: the GPU is the limit.

``python -m groupmoe.bench.host [--shape qwen3-30b-a3b] [--tokens 2048]``; on CPU everything is
synchronous, so host and wall agree (``--smoke`` checks that it runs).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from ..ops.activations import get_activation, scaled_forward
from ..ops.experts import gather_sum
from ..ops.grouped_gemm import grouped_mm
from ..ops.router import route
from ..ops.routing import build_routing
from .layer import environment
from .shapes import SHAPES, SMOKE_SHAPE, Shape
from .timing import sync


def host_and_wall_ms(fn: Callable[[], object], device: torch.device, calls: int = 20,
                     lead: Callable[[], object] | None = None) -> tuple[float, float]:
    """``(host ms, wall ms)`` per call of ``fn`` over ``calls`` calls after warm-up. ``lead``
    runs first (a long GPU op) so that the host never waits for the GPU while timed."""
    for _ in range(3):
        fn()
    sync(device)
    if lead is not None:
        lead()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync(device)
    wall_t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    wall = time.perf_counter() - wall_t0
    return host * 1e3 / calls, wall * 1e3 / calls


class HostProblem:
    """One layer's experts at ``shape`` for ``tokens`` tokens: the stacks, their NF4
    (double-quantized) copies, and the router's ids and weights."""

    def __init__(self, shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype):
        from ..nn import GroupedExperts
        from ..quant import QuantizedGroupedExperts

        self.shape = shape
        h, i, e = shape.hidden, shape.intermediate, shape.experts
        self.experts = GroupedExperts(h, i, e, shape.activation, device=device, dtype=dtype)
        self.quantized = QuantizedGroupedExperts.from_dense(
            self.experts.gate_up, self.experts.down, nested=True, dequant_chunk_bytes=None,
            activation=shape.activation, compute_dtype=dtype).to(device)
        self.x = torch.randn(tokens, h, device=device, dtype=dtype, requires_grad=True)
        logits = torch.randn(tokens, e, device=device)
        gates, self.ids = route(logits, shape.top_k, shape.router)
        self.gates = gates.to(dtype).requires_grad_(True)

    def pieces(self) -> dict[str, Callable[[], object]]:
        """The calls to time, by name."""
        x, ids, gates, experts, q = self.x, self.ids, self.gates, self.experts, self.quantized
        e = self.shape.experts
        routing = build_routing(ids, e, check_ids=False)
        xs = x.detach().index_select(0, routing.token_index)
        w1 = experts.gate_up.detach()
        h = grouped_mm(xs, w1, routing.offsets)
        g = gates.detach().reshape(-1).index_select(0, routing.order)
        act = get_activation(self.shape.activation)
        y = grouped_mm(scaled_forward(act, h, g), experts.down.detach(), routing.offsets)

        def fwd_bwd(module):
            def run():
                module(x, ids, gates, check_ids=False).sum().backward()
            return run

        return {
            "build_routing": lambda: build_routing(ids, e, check_ids=False),
            "index_select (gather rows)": lambda: x.detach().index_select(0,
                                                                           routing.token_index),
            "grouped_mm (gate_up)": lambda: grouped_mm(xs, w1, routing.offsets),
            "activation x router weight": lambda: scaled_forward(act, h, g),
            "gather_sum (combine)": lambda: gather_sum(y, routing, x.dtype),
            "experts forward": lambda: experts(x, ids, gates, check_ids=False),
            "experts forward+backward": fwd_bwd(experts),
            "NF4 dequantize (gate_up stack)": lambda: q.expert_weights("gate_up", 0, e),
            "NF4 experts forward": lambda: q(x, ids, gates, check_ids=False),
            "NF4 experts forward+backward": fwd_bwd(q),
        }


def measure(shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype,
            calls: int = 20) -> list[dict]:
    prob = HostProblem(shape, tokens, device, dtype)
    lead = None
    if device.type == "cuda":  # ~1 ms or more of GPU work ahead of the timed calls
        big = torch.randn(8192, 8192, device=device, dtype=dtype)

        def lead():
            for _ in range(8):
                big @ big
    rows = []
    for name, fn in prob.pieces().items():
        host, wall = host_and_wall_ms(fn, device, calls, lead)
        rows.append({"shape": shape.name, "tokens": tokens, "piece": name, "host_ms": host,
                     "wall_ms": wall, "host_over_wall": host / wall if wall else None})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    args = p.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    shape = SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = measure(shape, 64 if args.smoke else args.tokens, device, dtype, args.calls)
    print(f"{shape.name}, {rows[0]['tokens']} tokens, {device.type}")
    print("| piece | host ms/call | wall ms/call | host / wall |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['piece']} | {r['host_ms']:.3f} | {r['wall_ms']:.3f} | "
              f"{r['host_over_wall']:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": environment(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
