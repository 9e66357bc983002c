"""The per-layer benchmark shapes: DESIGN.md's four, and two with newer families'
activations."""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.activations import Activation


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    activation: str | Activation = "swiglu"
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
        # activations of the newer families, on the fused op's torch activation path:
        # GeGLU (tanh GELU, Gemma 4's experts) at qwen3-30b-a3b's sizes, and SwiGLU clamped at
        # 10 (DeepSeek-V4 / GLM-5 experts) at DeepSeek-V4's default config
        Shape("geglu-qwen3-dims", 2048, 768, 128, 8, Activation("gelu_tanh")),
        Shape("deepseek-v4", 4096, 2048, 256, 6, Activation(gate_limit=10.0, up_limit=10.0)),
    )
}

SMOKE_SHAPE = Shape("smoke", 64, 32, 8, 2)
