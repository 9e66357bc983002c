"""``groupmoe demo``: train a tiny MoE language model with the per-expert loop and with groupmoe.

The config is embedded (no downloads). Both runs start from the same weights and see the same
batches; the demo prints each step, tokens/s of both, the largest loss difference and peak
memory. Runs on CUDA when present, else on CPU.
"""

from __future__ import annotations

import copy
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from .nn import MoEBlock

TINY_CONFIG = dict(vocab=512, hidden=128, intermediate=64, experts=16, top_k=4, layers=2,
                   heads=4, seq=128, batch=8, steps=8, lr=3e-3)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        h = cfg["hidden"]
        self.norm1, self.norm2 = nn.RMSNorm(h, dtype=dtype), nn.RMSNorm(h, dtype=dtype)
        self.qkv = nn.Linear(h, 3 * h, bias=False, dtype=dtype)
        self.proj = nn.Linear(h, h, bias=False, dtype=dtype)
        self.heads = cfg["heads"]
        self.moe = MoEBlock(h, cfg["intermediate"], cfg["experts"], cfg["top_k"], dtype=dtype)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        moe_out, logits = self.moe(self.norm2(x))
        return x + moe_out, logits


class TinyMoELM(nn.Module):
    """Embedding, decoder layers of attention + MoE block, tied LM head."""

    def __init__(self, cfg, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["hidden"], dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg["layers"]))
        self.norm = nn.RMSNorm(cfg["hidden"], dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: keep initial logits small

    def set_impl(self, impl: str) -> None:
        for layer in self.layers:
            layer.moe.experts.impl = impl

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x, _ = layer(x)
        return self.norm(x) @ self.embed.weight.t()


def batches(cfg, device, seed=0):
    """Synthetic, learnable data: each sequence repeats a random 16-token motif."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg["steps"]):
        motif = torch.randint(0, cfg["vocab"], (cfg["batch"], 16), generator=gen)
        yield motif.repeat(1, cfg["seq"] // 16 + 1)[:, : cfg["seq"] + 1].to(device)


def train(model, cfg, device, label, log=print):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    losses, tokens, elapsed = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, seq in enumerate(batches(cfg, device)):
        t0 = time.perf_counter()
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if step > 0:  # the first step warms up kernels and allocator
            tokens += seq[:, :-1].numel()
            elapsed += dt
        losses.append(loss.item())
        log(f"  [{label:8s}] step {step + 1}/{cfg['steps']}  loss {loss.item():.4f}  "
            f"{seq[:, :-1].numel() / dt:,.0f} tok/s")
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else None)
    return losses, tokens / max(elapsed, 1e-9), peak


def run_demo(device: str | None = None, steps: int | None = None, log=print) -> dict:
    """Train the tiny model with ``loop`` and ``groupmoe`` experts; return the summary."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dict(TINY_CONFIG, steps=steps or TINY_CONFIG["steps"])
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = TinyMoELM(cfg, dtype).to(dev)
    log(f"groupmoe demo on {dev} ({dtype}): {cfg['layers']} layers, {cfg['experts']} experts, "
        f"top-{cfg['top_k']}, {cfg['batch']}x{cfg['seq']} tokens/step, {cfg['steps']} steps")
    results = {}
    for impl in ("loop", "groupmoe"):
        model = copy.deepcopy(base)
        model.set_impl(impl)
        results[impl] = train(model, cfg, dev, impl, log)
    (l_loop, tps_loop, mem_loop), (l_grp, tps_grp, mem_grp) = results["loop"], results["groupmoe"]
    max_diff = max(abs(a - b) for a, b in zip(l_loop, l_grp))
    log(f"tokens/s   loop {tps_loop:,.0f}   groupmoe {tps_grp:,.0f}   "
        f"speed-up {tps_grp / tps_loop:.2f}x")
    log(f"max |loss difference| per step: {max_diff:.2e}   "
        f"(final loss {l_loop[-1]:.4f} vs {l_grp[-1]:.4f})")
    if mem_loop is not None:
        log(f"peak memory: loop {mem_loop:.0f} MiB, groupmoe {mem_grp:.0f} MiB")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log(f"peak memory: CPU run, process peak RSS {rss:.0f} MiB (per-run figures need CUDA)")
    return {"loop": results["loop"], "groupmoe": results["groupmoe"], "max_loss_diff": max_diff}
