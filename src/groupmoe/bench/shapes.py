"""The per-layer benchmark shapes of DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    activation: str = "swiglu"
    bias: bool = False
    router: str = "softmax_topk"

    def flops_per_pass(self, tokens: int) -> int:
        """``2 * T * k * 3 * H * I``: one pass over the gate_up (2I) and down (I) GEMMs."""
        return 2 * tokens * self.top_k * 3 * self.hidden * self.intermediate


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
        Shape("olmoe-1b-7b", 2048, 1024, 64, 8),
        Shape("gpt-oss-20b", 2880, 2880, 32, 4, "gptoss", True, "topk_softmax"),
        Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    )
}

SMOKE_SHAPE = Shape("smoke", 64, 32, 8, 2)
