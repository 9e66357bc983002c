"""Accumulation precision: at least fp32, fp64 stays fp64 (so the fp64 oracle tests are exact)."""

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def to_accum(t: torch.Tensor) -> torch.Tensor:
    return t.to(accum_dtype(t.dtype))
