"""The models ``groupmoe finetune`` builds: real MoE configs by name (dimensions and depth of the
published checkpoints, random weights, nothing downloaded) or a local folder with
``config.json`` (and its weights when present)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..ops.checks import check

# transformers config class and its arguments: the published models' config.json values that
# shape the compute (vocabulary, widths, depth, heads, experts, context, RoPE)
MODELS: dict[str, tuple[str, dict]] = {
    "gpt-oss-20b": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
        layer_types=["sliding_attention", "full_attention"] * 12)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # --smoke: a Qwen3-MoE a CPU trains in seconds
    "tiny": ("Qwen3MoeConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=1024)),
}


@dataclass
class ModelSpec:
    """What to build: a transformers config, and the folder of its weights (``None``: random
    initialisation)."""

    name: str
    config: object
    weights: str | None


def model_spec(name_or_path: str, layers: int | None = None) -> ModelSpec:
    """The config of a built-in name (:data:`MODELS`) or of a local folder with
    ``config.json``; ``layers`` keeps the first ``layers`` decoder layers (a reduced-depth real
    config). Never downloads."""
    import transformers

    if name_or_path in MODELS:
        cls_name, kwargs = MODELS[name_or_path]
        config = getattr(transformers, cls_name)(**kwargs)
        weights = None
    elif os.path.isfile(os.path.join(name_or_path, "config.json")):
        config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        has = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name_or_path))
        weights = name_or_path if has else None
    else:
        raise ValueError(f"unknown model {name_or_path!r}: use one of {sorted(MODELS)} or a "
                         "local folder holding config.json")
    if layers is not None:
        total = config.num_hidden_layers
        check(1 <= layers <= total,
              f"--layers {layers}: {name_or_path} has {total} decoder layers")
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
        check(weights is None, "--layers applies to randomly initialised models only")
    return ModelSpec(name_or_path, config, weights)
