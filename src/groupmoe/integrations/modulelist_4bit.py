"""bitsandbytes 4-bit experts of transformers 4.x ``ModuleList`` MoE blocks as NF4 stacks.

Under ``BitsAndBytesConfig(load_in_4bit=True)`` every expert projection is a ``Linear4bit``
whose ``Params4bit`` holds the packed NF4 bytes of one ``[out, in]`` weight and a
``QuantState`` (fp32 absmax per block, or bitsandbytes' double-quantized absmax). When each
weight fills whole bytes and blocks (``out * in`` a multiple of ``2 * blocksize``), the
experts' bytes concatenated are one valid ``[E, out, in]`` NF4 stack; gate then up per expert
is the ``[E, 2I, H]`` gate_up stack (gate rows first), since a ``[2I, H]`` weight's bytes are
its gate rows' bytes followed by its up rows'.

Memory: the stack is built once per block and cached; each expert's ``Params4bit`` is then
re-pointed at its slice of the stack (a view), so the packed bytes exist once. Plain absmax is
shared the same way; a double-quantized absmax (an offset and second-level scales per expert)
is stored dequantized to fp32 in the stack (4 bytes per block of 64 weights, 1/8 of the packed
bytes), bit-identical to bitsandbytes' own dequantize; the experts keep their nested copy. The
cache is rebuilt when any expert's weight, its storage or its ``QuantState`` changes (e.g.
``model.to(device)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.nf4 import BLOCKSIZES, NF4Tensor, stack_nf4

_CACHE = "_groupmoe_nf4_stacks"


def is_4bit(lin: nn.Module) -> bool:
    """Whether ``lin`` is a bitsandbytes 4-bit Linear (its weight a ``Params4bit``)."""
    return type(getattr(lin, "weight", None)).__name__ == "Params4bit"


def _one_reason(lin: nn.Module) -> str | None:
    if getattr(lin, "bias", None) is not None:
        return "4-bit weight with a bias"
    state = getattr(lin.weight, "quant_state", None)
    if state is None:
        return "Params4bit not quantized yet (move the model to its device)"
    if state.quant_type != "nf4":
        return f"bitsandbytes {state.quant_type} 4-bit weights (only nf4 runs grouped)"
    if getattr(state, "packing_format_for_cpu", False):
        return "4-bit weights repacked for bitsandbytes' CPU inference kernel"
    if state.blocksize not in BLOCKSIZES or len(state.shape) != 2:
        return f"4-bit weight of shape {tuple(state.shape)}, blocksize {state.blocksize}"
    n = state.shape[0] * state.shape[1]
    if n % (2 * state.blocksize):
        return f"4-bit weight of {n} elements is not a multiple of 2*blocksize " \
               f"({2 * state.blocksize}): experts do not concatenate exactly"
    return None


def reason_4bit(lins: list[list[nn.Module]]) -> str | None:
    """Why the experts' 4-bit projections (``[gates, ups, downs]``, base Linears) cannot run
    as NF4 stacks, or ``None``."""
    flat = [lin for proj in lins for lin in proj]
    if not all(map(is_4bit, flat)):
        return "some expert projections are 4-bit and some are not"
    for idx, lin in enumerate(flat):
        why = _one_reason(lin)
        if why is not None:
            return f"expert {idx % len(lins[0])}: {why}"
    for proj in lins:
        states = [lin.weight.quant_state for lin in proj]
        if len({(tuple(s.shape), s.blocksize, s.dtype) for s in states}) != 1:
            return "4-bit experts differ in shape, blocksize or dtype"
    g, u = lins[0][0].weight.quant_state, lins[1][0].weight.quant_state
    if (tuple(g.shape), g.blocksize, g.dtype) != (tuple(u.shape), u.blocksize, u.dtype):
        return "4-bit gate and up projections differ in shape, blocksize or dtype"
    return None


def describe(lins: list[list[nn.Module]]) -> str:
    """A short description of the experts' 4-bit weights for reports."""
    state = lins[0][0].weight.quant_state
    nested = ", double-quantized absmax" if state.nested else ""
    return f"NF4 (bitsandbytes Linear4bit experts{nested}, blocksize {state.blocksize})"


def runtime_reason_4bit(lins: list[list[nn.Module]], x: torch.Tensor) -> str | None:
    """:func:`reason_4bit`, plus what bitsandbytes would compute for input ``x``: it
    dequantizes to the recorded dtype, casts to its compute dtype and multiplies there, so the
    grouped path (dequantize and multiply in ``x.dtype``) is exact only when both equal
    ``x.dtype``."""
    why = reason_4bit(lins)
    if why is not None:
        return why
    state = lins[0][0].weight.quant_state
    for proj in lins:
        for p in proj:
            compute = _compute_dtype(p, x.dtype)
            if state.dtype != x.dtype or compute != x.dtype:
                return f"4-bit weights of dtype {state.dtype} computed in {compute}, " \
                       f"input {x.dtype}"
            if p.weight.device != x.device:  # any expert (device_map / offload splits)
                return f"4-bit weights on {p.weight.device}, input on {x.device}"
    return None


def _compute_dtype(lin: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype bitsandbytes multiplies in for an input of ``dtype``: it switches an unset
    compute dtype to fp32/bf16 inputs' dtype on the first call."""
    if not lin.compute_type_is_set and dtype in (torch.float32, torch.bfloat16):
        return dtype
    return lin.compute_dtype or dtype


def _key(flat: list[nn.Module]) -> tuple:
    return tuple((id(lin.weight), lin.weight.data_ptr(), id(lin.weight.quant_state))
                 for lin in flat)


def _stack_and_share(lins: list[nn.Module], shape: tuple[int, ...]) -> NF4Tensor:
    """The NF4 stack of ``lins``' weights in order, reshaped to ``shape``; each Params4bit
    (and its plain absmax) then views its slice of the stack."""
    parts = [NF4Tensor.from_bnb(lin.weight.data, lin.weight.quant_state) for lin in lins]
    stack = stack_nf4(parts)
    packed, absmax = stack.packed.reshape(-1), stack.absmax
    nb, na = packed.numel() // len(lins), absmax.numel() // len(lins)
    for i, lin in enumerate(lins):
        w = lin.weight
        w.data = packed[i * nb:(i + 1) * nb].view(w.dtype).view(w.shape)
        if not w.quant_state.nested:
            w.quant_state.absmax = absmax[i * na:(i + 1) * na]
    return NF4Tensor(stack.packed, absmax, torch.Size(shape), stack.dtype, stack.blocksize)


def nf4_stacks(block: nn.Module, lins: list[list[nn.Module]]) -> tuple[NF4Tensor, NF4Tensor]:
    """``(gate_up [E, 2I, H], down [E, H, I])`` NF4 stacks of a block whose experts passed
    :func:`reason_4bit`; built once, cached on the block (see module docstring)."""
    gates, ups, downs = lins
    flat = [lin for proj in lins for lin in proj]
    cached = getattr(block, _CACHE, None)
    if cached is not None and cached[0] == _key(flat):
        return cached[1]
    e = len(gates)
    (i, h) = gates[0].weight.quant_state.shape
    interleaved = [lin for pair in zip(gates, ups) for lin in pair]  # g0, u0, g1, u1, ...
    stacks = (_stack_and_share(interleaved, (e, 2 * i, h)), _stack_and_share(downs, (e, h, i)))
    setattr(block, _CACHE, (_key(flat), stacks))
    return stacks


def drop_cache(block: nn.Module) -> None:
    """Forget a block's cached stacks (the experts keep viewing the shared bytes)."""
    block.__dict__.pop(_CACHE, None)
