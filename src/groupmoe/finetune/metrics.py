"""What a fine-tuning run records: per-step loss, tokens/s and peak memory in a JSON file that
is rewritten after every step (an interrupted run leaves a valid file of the steps done),
where the memory goes, and the loss-curve PNG."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from torch import nn

from ..bench.timing import sync


def write_json(path: str, data: dict) -> None:
    """Atomically: a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def static_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers by what they hold."""
    sizes: dict[str, int] = {}
    seen = set()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        if "lora_" in name:
            kind = "LoRA adapters"
        elif ".experts." in name:
            quantized = not t.is_floating_point() or "parametrizations" in name
            kind = "experts (4-bit)" if quantized else "experts"
        elif "embed" in name or "lm_head" in name:
            kind = "embeddings and LM head"
        elif "self_attn" in name:
            kind = "attention (4-bit)" if not t.is_floating_point() else "attention"
        else:
            kind = "norms, routers, other"
        sizes[kind] = sizes.get(kind, 0) + t.numel() * t.element_size()
    return sizes


def optimizer_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


class Metrics:
    """The run's record, written to ``path`` on every update."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.data = {**meta, "steps": [], "status": "running"}
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.flush()

    def step(self, step: int, **values) -> None:
        rows = self.data["steps"]
        if rows and rows[-1]["step"] == step:
            rows[-1].update(values)
        else:
            rows.append({"step": step, **values})
        self.flush()

    def update(self, **values) -> None:
        self.data.update(values)
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)

    def summary(self, warmup: int = 2) -> dict:
        """Median tokens/s after ``warmup`` steps (compilation, allocator) and outside the
        profiled ones, final loss, peak."""
        rows = self.data["steps"]
        timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and not r.get("profiled")]
        speed = timed[warmup:] or timed
        losses = [r["loss"] for r in rows if "loss" in r]
        peaks = [r["peak_mib"] for r in rows if r.get("peak_mib") is not None]
        return {"steps_done": len(rows),
                "tokens_per_s": statistics.median(speed) if speed else None,
                "final_loss": losses[-1] if losses else None,
                "peak_mib": max(peaks) if peaks else None}


class StepClock:
    """Wall time between optimizer steps (synchronised with the GPU at each step's end)."""

    def __init__(self, device: torch.device):
        self.device, self.last = device, None

    def start(self) -> None:
        sync(self.device)
        self.last = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str, title: str) -> str | None:
    """Loss curves on one PNG (``None`` and nothing written when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":", "-.")
    for (label, points), style in zip(curves.items(), styles * 4):
        if points:  # dashed over solid: curves that coincide stay visible
            ax.plot(*zip(*points), style, label=label, linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
