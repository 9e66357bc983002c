"""``groupmoe finetune``: whole-model LoRA / QLoRA fine-tuning of MoE models (real configs, random
weights or a local checkpoint) with transformers' ``Trainer``, against transformers' own experts
implementations on the same seed and data."""

from .configs import MODELS, model_spec
from .run import FinetuneConfig, FinetuneOOM, compare, finetune, smoke_config

__all__ = ["MODELS", "FinetuneConfig", "FinetuneOOM", "compare", "finetune", "model_spec",
           "smoke_config"]
