"""Test helper: swap the expert Linears of ModuleList MoE blocks for bitsandbytes ``Linear4bit``
(quantized on CPU), as ``BitsAndBytesConfig(load_in_4bit=True)`` does on a GPU."""

import pytest
import torch
from torch import nn


def quantize_expert_linears(model: nn.Module, names, nested=False, compute_dtype=None,
                            quant_type="nf4", blocksize=64, bias=False):
    """Replace every expert's ``names`` Linears (in blocks with a ``ModuleList`` ``experts``)
    by ``Linear4bit`` holding the same weight quantized; returns how many were replaced."""
    bnb = pytest.importorskip("bitsandbytes")
    count = 0
    for block in list(model.modules()):
        if not isinstance(getattr(block, "experts", None), nn.ModuleList):
            continue
        for expert in block.experts:
            for n in names:
                lin = getattr(expert, n)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias,
                                      compute_dtype=compute_dtype, quant_type=quant_type,
                                      compress_statistics=nested)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                             quant_type=quant_type, blocksize=blocksize,
                                             compress_statistics=nested)
                if bias:
                    q.bias = nn.Parameter(torch.randn(lin.out_features, dtype=lin.weight.dtype))
                setattr(expert, n, q.to(lin.weight.device))
                count += 1
    return count
