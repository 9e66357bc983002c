"""What one forward keeps for its backward, tensor by tensor.

Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``; this
records each distinct storage once with its shape, dtype and size, and whether it is a
parameter, the layer's input, or an activation the forward made (the memory that backward
needs and that adds up across layers). On CUDA it also reports what the forward left
allocated (``memory_allocated`` before and after, the output included): more than the saved
activations plus the output means something outside autograd's saved tensors stays alive.

``python -m groupmoe.bench.saved --impl block --shape qwen3-30b-a3b --tokens 8192``
(``--smoke``: tiny shape on CPU).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .shapes import SHAPES, SMOKE_SHAPE, Shape
from .timing import sync


@dataclass
class Saved:
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int
    kind: str  # "parameter", "input" or "activation"


def saved_tensors(forward: Callable[[], object], params: list[torch.Tensor],
                  inputs: list[torch.Tensor]) -> tuple[list[Saved], object]:
    """The distinct storages autograd saves while ``forward()`` runs, and its result."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, Saved] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            kind = "parameter" if ptr in param_ptrs else "input" if ptr in input_ptrs \
                else "activation"
            seen[ptr] = Saved(tuple(t.shape), t.dtype, storage.nbytes(), kind)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return list(seen.values()), result


def _problem(impl: str, shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype):
    from ..nn import MoEBlock
    from ..ops.router import route

    block = MoEBlock(shape.hidden, shape.intermediate, shape.experts, shape.top_k,
                     activation=shape.activation, expert_bias=shape.bias, device=device,
                     dtype=dtype)
    x = torch.randn(tokens, shape.hidden, device=device, dtype=dtype, requires_grad=True)
    if impl == "block":
        return (lambda: block(x)), list(block.parameters()), [x]
    gates, ids = route(torch.randn(tokens, shape.experts, device=device), shape.top_k,
                       shape.router)
    gates = gates.to(dtype).requires_grad_(True)
    experts = block.experts
    return (lambda: experts(x, ids, gates, check_ids=False)), list(experts.parameters()), \
        [x, gates]


def report(impl: str, shape: Shape, tokens: int, device: torch.device,
           dtype: torch.dtype) -> str:
    forward, params, inputs = _problem(impl, shape, tokens, device, dtype)
    forward()  # warm-up: kernels compiled, caches filled
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    saved, result = saved_tensors(forward, params, inputs)
    sync(device)
    held = torch.cuda.memory_allocated(device) - before if before is not None else None
    outputs = result if isinstance(result, tuple) else (result,)
    out_bytes = sum(t.untyped_storage().nbytes() for t in outputs
                    if isinstance(t, torch.Tensor))
    mib = 2 ** 20
    lines = [f"{impl} {shape.name}, {tokens} tokens, {dtype}, {device.type}",
             "| kind | shape | dtype | MiB |", "|---|---|---|---|"]
    for s in sorted(saved, key=lambda s: -s.bytes):
        lines.append(f"| {s.kind} | {list(s.shape)} | {str(s.dtype)[6:]} | "
                     f"{s.bytes / mib:.2f} |")
    acts = sum(s.bytes for s in saved if s.kind == "activation")
    lines.append(f"saved activations {acts / mib:.1f} MiB + outputs {out_bytes / mib:.1f} MiB"
                 + ("" if held is None else f"; left allocated by the forward {held / mib:.1f}"
                    " MiB"))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="block", choices=["block", "experts"])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    shape = SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
    dtype = torch.bfloat16 if cuda else torch.float32
    print(report(args.impl, shape, 32 if args.smoke else args.tokens, device, dtype))


if __name__ == "__main__":
    main()
