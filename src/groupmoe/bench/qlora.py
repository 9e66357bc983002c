"""QLoRA training step of one MoE layer's experts: groupmoe (NF4 stacks dequantized a range of
experts at a time, grouped GEMMs, grouped LoRA) against a per-expert loop.

The loop baseline is bitsandbytes ``Linear4bit`` experts with per-expert LoRA when
bitsandbytes is installed (``baseline="bnb-linear4bit-loop"``), else a loop that dequantizes
each expert with groupmoe's NF4 and multiplies (``"groupmoe-nf4-loop"``). Both see the same
routing, LoRA rank and dtype; only LoRA factors and ``x`` get gradients. Each groupmoe variant
(``--variants``: ``chunked:<MiB>`` for ``dequant_chunk_bytes``, ``recompute``, ``cache``) gets
a row with its peak memory against the loop's (``mem_ratio`` = groupmoe / loop).

    python -m groupmoe.bench.qlora --out qlora.json           # CUDA, bf16, T=8192
    python -m groupmoe.bench.qlora --smoke --out smoke.json   # tiny, CPU, fp32
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ..lora.experts import ExpertLoRAModule
from ..ops.activations import get_activation
from ..quant.experts import QuantizedGroupedExperts
from ..quant.nf4 import _bnb_available, dequantize_nf4, quantize_nf4

DEFAULT_VARIANTS = ("chunked:256", "chunked:128", "chunked:512", "chunked:1024", "recompute")
SHAPES = {  # name: (H, I, E, k, activation, bias)
    "qwen3-30b-a3b": (2048, 768, 128, 8, "swiglu", False),
    "gpt-oss-20b": (2880, 2880, 32, 4, "gptoss", True),
}
SMOKE = {"qwen3-tiny": (64, 32, 8, 2, "swiglu", False), "gptoss-tiny": (64, 64, 4, 2, "gptoss",
                                                                          True)}


class LoopExperts(torch.nn.Module):
    """Per-expert loop over 4-bit experts with LoRA (the baseline)."""

    def __init__(self, w1, w2, b1, b2, lora: ExpertLoRAModule, activation, dtype, use_bnb):
        super().__init__()
        self.act, self.lora, self.dtype, self.use_bnb = get_activation(activation), lora, dtype, \
            use_bnb
        self.b1, self.b2 = b1, b2
        e = w1.shape[0]
        if use_bnb:
            import bitsandbytes as bnb

            def lin(w):
                m = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype,
                                      quant_type="nf4", device="cpu")
                m.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
                return m.to(w.device)
            self.gu = torch.nn.ModuleList(lin(w1[i]) for i in range(e))
            self.dn = torch.nn.ModuleList(lin(w2[i]) for i in range(e))
        else:
            self.gu = [quantize_nf4(w1[i]) for i in range(e)]
            self.dn = [quantize_nf4(w2[i]) for i in range(e)]

    def _proj(self, mods, i, x):
        if self.use_bnb:
            return mods[i](x)
        return x @ dequantize_nf4(mods[i], self.dtype).t()

    def forward(self, x, ids, gates):
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        f = self.lora.factors()
        gu, dn = f.gate_up, f.down
        for i in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == i)
            xe = x[tok]
            h = self._proj(self.gu, i, xe) + (xe @ gu.a[i]) @ gu.b[i] * gu.scale
            if self.b1 is not None:
                h = h + self.b1[i]
            a = self.act(h)
            y = self._proj(self.dn, i, a) + (a @ dn.a[i]) @ dn.b[i] * dn.scale
            if self.b2 is not None:
                y = y + self.b2[i]
            out.index_add_(0, tok, (gates[tok, slot, None] * y).float())
        return out.to(x.dtype)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _step(mod, x, ids, gates, lora_params):
    out = mod(x, ids, gates)
    if not out.requires_grad:
        raise RuntimeError(f"{type(mod).__name__}: output has no autograd graph "
                           f"(grad enabled: {torch.is_grad_enabled()}, x requires grad: "
                           f"{x.requires_grad}, LoRA requires grad: "
                           f"{[p.requires_grad for p in lora_params]})")
    out.backward(torch.ones_like(out))
    for p in lora_params + [x]:
        p.grad = None


def _measure(mod, x, ids, gates, lora_params, iters, warmup):
    dev = x.device
    for _ in range(warmup):
        _step(mod, x, ids, gates, lora_params)
    _sync(dev)
    base = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(iters):
        _step(mod, x, ids, gates, lora_params)
    _sync(dev)
    ms = (time.perf_counter() - t0) / iters * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if dev.type == "cuda" else None
    return ms, peak


def _variant(spec: str) -> dict:
    """``"chunked:<MiB>"``, ``"recompute"`` or ``"cache"`` -> QuantizedGroupedExperts kwargs."""
    dequant, _, mib = spec.partition(":")
    if dequant not in ("chunked", "recompute", "cache") or bool(mib) != (dequant == "chunked"):
        raise ValueError(f"bad variant {spec!r}: use chunked:<MiB>, recompute or cache")
    kw = {"dequant": dequant}
    if mib:
        kw["dequant_chunk_bytes"] = int(float(mib) * 2 ** 20)
    return kw


def bench_shape(name, shape, tokens, rank, dtype, device, iters, warmup, variants):
    h, i, e, k, act, bias = shape
    torch.manual_seed(0)
    w1 = torch.randn(e, 2 * i, h, device=device, dtype=dtype) / math.sqrt(h)  # nn.Linear layout
    w2 = torch.randn(e, h, i, device=device, dtype=dtype) / math.sqrt(i)
    b1 = torch.randn(e, 2 * i, device=device, dtype=dtype) * 0.02 if bias else None
    b2 = torch.randn(e, h, device=device, dtype=dtype) * 0.02 if bias else None
    q1, q2 = quantize_nf4(w1), quantize_nf4(w2)
    grouped = [QuantizedGroupedExperts(q1, q2, act, b1, b2, compute_dtype=dtype, lora_rank=rank,
                                       lora_alpha=2 * rank, **_variant(v)) for v in variants]
    lora = grouped[0].lora
    torch.nn.init.normal_(lora.gate_up_b, std=0.01)
    torch.nn.init.normal_(lora.down_b, std=0.01)
    lora.to(device=device, dtype=dtype)
    for g in grouped[1:]:
        g.lora = lora  # one set of adapters for all variants and the loop
    x = torch.randn(tokens, h, device=device, dtype=dtype, requires_grad=True)
    logits = torch.randn(tokens, e, device=device)
    gates, ids = F.softmax(logits, -1).topk(k, -1)
    gates = (gates / gates.sum(-1, keepdim=True)).to(dtype)
    use_bnb = _bnb_available() and device.type == "cuda"
    loop = LoopExperts(w1, w2, b1, b2, lora, act, dtype, use_bnb)
    del w1, w2
    params = list(lora.parameters())
    base = {"shape": name, "tokens": tokens, "rank": rank,
            "baseline": "bnb-linear4bit-loop" if use_bnb else "groupmoe-nf4-loop"}
    loop_ms, loop_peak = _measure(loop, x, ids, gates, params, iters, warmup)
    rows = []
    with torch.no_grad():
        ref = loop(x, ids, gates).float()
    for spec, mod in zip(variants, grouped):
        with torch.no_grad():
            diff = float((mod(x, ids, gates).float() - ref).norm() / ref.norm())
        ms, peak = _measure(mod, x, ids, gates, params, iters, warmup)
        rows.append({**base, "variant": spec, "rel_diff_vs_loop": diff,
                     "groupmoe_ms": round(ms, 3), "loop_ms": round(loop_ms, 3),
                     "groupmoe_tok_s": round(tokens / ms * 1e3, 1),
                     "loop_tok_s": round(tokens / loop_ms * 1e3, 1),
                     "speedup": round(loop_ms / ms, 2),
                     "groupmoe_peak_mib": None if peak is None else round(peak, 1),
                     "loop_peak_mib": None if loop_peak is None else round(loop_peak, 1),
                     "mem_ratio": None if peak is None else round(peak / loop_peak, 3)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (fp32)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="groupmoe variants: chunked:<MiB>, recompute, cache")
    ap.add_argument("--shapes", nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        shapes, device, dtype, tokens, iters, warmup = SMOKE, torch.device("cpu"), \
            torch.float32, 32, 1, 0
    else:
        shapes, device, dtype, tokens, iters, warmup = SHAPES, torch.device("cuda"), \
            torch.bfloat16, args.tokens, args.iters, 2
    names = args.shapes or list(shapes)
    variants = [v for v in args.variants if _variant(v)]
    rows = [r for n in names for r in bench_shape(n, shapes[n], tokens, args.rank, dtype, device,
                                                  iters, warmup, variants)]
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if
            device.type == "cuda" else "cpu"}
    try:
        import bitsandbytes
        meta["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        meta["bitsandbytes"] = None
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"{'shape':14} {'variant':13} {'baseline':19} {'grp ms':>7} {'loop ms':>8} "
          f"{'grp tok/s':>10} {'loop tok/s':>10} {'x':>6} {'grp MiB':>8} {'loop MiB':>8} "
          f"{'mem':>6}")
    for r in rows:
        print(f"{r['shape']:14} {r['variant']:13} {r['baseline']:19} {r['groupmoe_ms']:7.2f} "
              f"{r['loop_ms']:8.2f} {r['groupmoe_tok_s']:10.0f} {r['loop_tok_s']:10.0f} "
              f"{r['speedup']:6.2f} {r['groupmoe_peak_mib'] or 0:8.0f} "
              f"{r['loop_peak_mib'] or 0:8.0f} {r['mem_ratio'] or 0:6.3f}")
    return rows


if __name__ == "__main__":
    main()
