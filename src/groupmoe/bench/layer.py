"""``groupmoe bench``: one MoE layer's forward+backward per implementation, against a dense chain.

Implementations: ``loop`` (per-expert reference), ``naive`` (sort + grouped_mm + plain
autograd), ``groupmoe`` (the fused memory-lean Function, ``save="h"``),
``groupmoe-recompute`` (``save="none"``), ``groupmoe-torch`` / ``groupmoe-triton`` (``save="h"``
with ``backend="torch"`` / ``"triton"``: torch grouped_mm, or the fused Triton forward and
backward kernels, against ``groupmoe``'s ``auto`` pick), ``groupmoe-fp8``
(``precision="fp8"``: e4m3 forward and dX GEMMs), ``block`` (the whole layer:
:class:`~groupmoe.MoEBlock` with its router on the hidden states, not handed the routing),
peers (:mod:`groupmoe.bench.peers`: ``liger`` experts, ``sonicmoe`` whole layer) and
``dense``: the same FLOPs as one dense GEMM chain ``act(x W1) W2`` over ``T*k`` rows, i.e. the
GPU's speed at this work with routing free. Modes: ``train`` (expert weights get gradients, 3
GEMM passes), ``frozen`` (only dX, 2 passes) and ``forward`` (the training forward alone).
Besides time and peak memory each row has the memory held after the forward (what backward
will need, the output included) and the time of the first step (compilation and autotuning
included).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from datetime import date

import torch

from ..ops import build_routing, expert_mlp, expert_mlp_naive, expert_mlp_reference, route
from ..ops.activations import get_activation
from .peers import PEERS, liger_forward, sonicmoe_forward, unavailable
from .shapes import SHAPES, SMOKE_SHAPE, Shape
from .timing import first_call_s, held_bytes, median_ms, peak_extra_bytes

IMPLS = ("loop", "naive", "groupmoe", "groupmoe-recompute", "dense", "groupmoe-torch",
         "groupmoe-triton", "groupmoe-fp8", "block", *PEERS)
IMPL_BACKENDS = {"groupmoe-torch": "torch", "groupmoe-triton": "triton"}  # else the default
DEFAULT_IMPLS = ("loop", "naive", "groupmoe", "dense")
MODES = ("train", "frozen", "forward")
DEFAULT_MODES = ("train", "frozen")


@dataclass
class Row:
    shape: str
    mode: str
    impl: str
    tokens: int
    ms: float
    tflops: float
    peak_extra_mib: float | None
    held_mib: float | None = None
    first_step_s: float | None = None
    x_dense: float | None = None
    x_naive: float | None = None


class LayerProblem:
    """Weights and a few rotating input sets for one shape; a step function per impl."""

    def __init__(self, shape: Shape, tokens: int, mode: str, device, dtype, sets: int = 3):
        self.shape, self.tokens, self.mode = shape, tokens, mode
        self.device = torch.device(device)
        train = mode in ("train", "forward")
        h, i, e = shape.hidden, shape.intermediate, shape.experts
        f = {"device": device, "dtype": dtype}

        def param(*size, std):
            return (torch.randn(*size, **f) * std).requires_grad_(train)

        self.w1, self.w2 = param(e, h, 2 * i, std=h ** -0.5), param(e, i, h, std=i ** -0.5)
        self.b1 = param(e, 2 * i, std=0.02) if shape.bias else None
        self.b2 = param(e, h, std=0.02) if shape.bias else None
        self.dw1, self.dw2 = param(h, 2 * i, std=h ** -0.5), param(i, h, std=i ** -0.5)
        self.act = get_activation(shape.activation)
        self.peer_weights: list[torch.Tensor] = []  # peers' copies in their own layouts
        self.inputs = []
        for _ in range(sets):
            x = torch.randn(tokens, h, **f).requires_grad_(True)
            logits = torch.randn(tokens, e, **f)
            gates, ids = route(logits, shape.top_k, shape.router)
            gates = gates.detach().requires_grad_(train)
            dout = torch.randn(tokens, h, **f)
            xd = torch.randn(tokens * shape.top_k, h, **f).requires_grad_(True)
            self.inputs.append((x, ids, gates, dout, xd))

    def params(self):
        return [p for p in (self.w1, self.w2, self.b1, self.b2, self.dw1, self.dw2,
                            *self.peer_weights) if p is not None]

    def clear_grads(self) -> None:
        for x, _, gates, _, xd in self.inputs:
            self._clear([x, gates, xd])
        self._clear(self.params())

    def _clear(self, tensors):
        for t in tensors:
            t.grad = None

    def forward_fn(self, impl: str):
        """``forward(it) -> (out, dout)``: one training forward of ``impl`` on input set
        ``it`` and the gradient its backward takes."""
        if impl == "liger":
            return liger_forward(self)
        if impl == "sonicmoe":
            return sonicmoe_forward(self)
        if impl == "block":
            return self._block_forward()
        weights = (self.w1, self.w2, self.b1, self.b2, self.act)

        def forward(it: int):
            x, ids, gates, dout, xd = self.inputs[it % len(self.inputs)]
            self._clear([x, gates, xd, *self.params()])
            if impl == "dense":
                out = self.act(xd @ self.dw1) @ self.dw2
                return out, torch.ones_like(out)
            if impl == "loop":
                return expert_mlp_reference(x, ids, gates, *weights), dout
            # ids from route(): in range, so no range check (nor its device sync), as in the
            # transformers integration and MoEBlock
            routing = build_routing(ids, self.shape.experts, check_ids=False)
            if impl == "naive":
                return expert_mlp_naive(x, routing, gates, *weights), dout
            save = "none" if impl == "groupmoe-recompute" else "h"
            precision = "fp8" if impl == "groupmoe-fp8" else "default"
            return expert_mlp(x, routing, gates, *weights, save=save,
                              backend=IMPL_BACKENDS.get(impl), precision=precision), dout

        return forward

    def _block_forward(self):
        from ..nn import MoEBlock

        s = self.shape
        block = MoEBlock(s.hidden, s.intermediate, s.experts, s.top_k, router=s.router,
                         router_bias=s.bias, activation=s.activation, expert_bias=s.bias,
                         device=self.device, dtype=self.w1.dtype)
        block.requires_grad_(self.mode == "train")
        self.peer_weights += list(block.parameters())  # clear_grads() frees their grads

        def forward(it: int):
            x, _, _, dout, _ = self.inputs[it % len(self.inputs)]
            self._clear([x, *block.parameters()])
            return block(x)[0], dout

        return forward

    def step_fn(self, impl: str):
        """One step of ``impl`` in this problem's mode (see :meth:`step_of`)."""
        return self.step_of(self.forward_fn(impl))

    def step_of(self, forward):
        """A step of ``forward``: the forward, then (but in ``forward`` mode) its backward."""

        def step(it: int) -> None:
            out, dout = forward(it)
            if self.mode != "forward":
                out.backward(dout)

        return step

    def flops(self) -> int:
        passes = {"train": 3, "frozen": 2, "forward": 1}[self.mode]
        return passes * self.shape.flops_per_pass(self.tokens)


def bench_layer(shapes, tokens: int, modes=DEFAULT_MODES, impls=DEFAULT_IMPLS, device=None,
                dtype=torch.bfloat16, repeat: int = 20, log=print) -> list[Row]:
    """Time every (shape, mode, impl); returns rows with ratios to ``dense`` and ``naive``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[Row] = []
    for shape in shapes:
        for mode in modes:
            prob = LayerProblem(shape, tokens, mode, device, dtype)
            by_impl: dict[str, Row] = {}
            for impl in impls:
                why = unavailable(impl, shape, device) if impl in PEERS else None
                if why:
                    log(f"  {shape.name:14s} {mode:6s} {impl:9s} skipped: {why}")
                    continue
                forward = prob.forward_fn(impl)
                step = prob.step_of(forward)
                reps = max(3, repeat // 4) if impl == "loop" else repeat
                try:
                    first = first_call_s(step, device)
                    ms = median_ms(step, device, warmup=2 if impl == "loop" else 3, repeat=reps)
                    prob.clear_grads()  # measure from a state without last step's grads
                    peak = peak_extra_bytes(lambda s=step: s(0), device)
                    prob.clear_grads()
                    held = held_bytes(lambda f=forward: f(0), device)
                except torch.OutOfMemoryError:
                    log(f"  {shape.name:14s} {mode:6s} {impl:15s} out of memory")
                    torch.cuda.empty_cache()
                    continue
                except ValueError as e:  # e.g. backend="triton" on an activation it lacks
                    log(f"  {shape.name:14s} {mode:6s} {impl:15s} cannot run: {e}")
                    continue
                row = Row(shape.name, mode, impl, tokens, ms, prob.flops() / ms / 1e9,
                          _mib(peak), _mib(held), first)
                by_impl[impl] = row
                log(f"  {shape.name:14s} {mode:7s} {impl:15s} {ms:9.2f} ms "
                    f"{row.tflops:7.1f} TFLOP/s  peak extra "
                    f"{'-' if peak is None else f'{row.peak_extra_mib:.0f} MiB'}  held "
                    f"{'-' if held is None else f'{row.held_mib:.0f} MiB'}  first step "
                    f"{first:.2f} s")
            for row in by_impl.values():
                if "dense" in by_impl:
                    row.x_dense = row.ms / by_impl["dense"].ms
                if "naive" in by_impl:
                    row.x_naive = by_impl["naive"].ms / row.ms
                rows.append(row)
            del prob
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2 ** 20


def format_table(rows: list[Row]) -> str:
    head = ("| shape | mode | impl | ms | TFLOP/s | peak extra MiB | held after forward MiB | "
            "first step s | time / dense | speed-up vs naive |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        peak = "-" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.0f}"
        held = "-" if r.held_mib is None else f"{r.held_mib:.0f}"
        first = "-" if r.first_step_s is None else f"{r.first_step_s:.2f}"
        xd = "-" if r.x_dense is None else f"{r.x_dense:.2f}"
        xn = "-" if r.x_naive is None else f"{r.x_naive:.2f}x"
        lines.append(f"| {r.shape} | {r.mode} | {r.impl} | {r.ms:.2f} | {r.tflops:.1f} | "
                     f"{peak} | {held} | {first} | {xd} | {xn} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "date": date.today().isoformat(),
           "python": platform.python_version()}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return env


def main(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        shapes, tokens = [SMOKE_SHAPE], args.tokens or 64
    else:
        unknown = set(args.shapes) - set(SHAPES)
        if unknown:
            raise SystemExit(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
        shapes, tokens = [SHAPES[s] for s in args.shapes], args.tokens or 8192
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    print(f"groupmoe bench: {env['device']}, torch {env['torch']}, {args.dtype}, T={tokens}")
    rows = bench_layer(shapes, tokens, args.modes, args.impls, device, dtype, args.repeat)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "dtype": args.dtype, "rows": [asdict(r) for r in rows]},
                      fh, indent=1)
        print(f"wrote {args.out}")


def add_arguments(p) -> None:
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="DESIGN.md shape names")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default 8192)")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--repeat", type=int, default=20, help="timed runs per cell (median)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shape, for a quick CPU check")
