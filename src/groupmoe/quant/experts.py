"""Frozen NF4 experts on the grouped path, optionally with grouped LoRA.

``dequant="chunked"`` (default) dequantizes a range of experts at a time, forward and backward
(:mod:`groupmoe.lora.chunked`): the step is one autograd node that saves only ``x``, ``h`` and
rank-``r`` LoRA intermediates, and no dequantized stack is kept. The range size comes from
``dequant_chunk_bytes`` (the largest dequantized chunk of one stack): smaller means less memory
(weights and per-chunk activations) but more, smaller GEMM launches and one host sync per call
(the rows of each range are read back); experts are never split, so one expert's weights is the
floor. ``None`` dequantizes each stack whole for the step, transiently, with no host sync.

``dequant="recompute"`` dequantizes whole stacks and keeps none on the autograd tape: a
saved-tensor hook swaps each saved view of a dequantized stack for a recipe and rebuilds it in
backward. ``"cache"`` keeps the whole stacks saved (most memory).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

from ..lora.chunked import ChunkedWeights, chunked_expert_mlp, register_weight_source
from ..lora.experts import ExpertLoRAModule, expert_mlp_lora
from ..lora.factors import ExpertLoRA
from ..ops.activations import get_activation
from ..ops.checks import check
from ..ops.experts import SaveMode, expert_mlp
from ..ops.recompute import recompute_saved
from ..ops.routing import build_routing
from .nf4 import Backend, NF4Tensor, dequantize_nf4, dequantize_nf4_experts, quantize_nf4

DequantMode = Literal["chunked", "recompute", "cache"]
DEQUANT_MODES = ("chunked", "recompute", "cache")
# Default dequantized chunk: 256 MiB per stack chunk (qwen3-30b-a3b gate_up: 32 of 128 experts;
# gpt-oss-20b gate_up: 8 of 32), about a quarter of the largest stacks measured.
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20
Layout = Literal["out_in", "in_out"]


def _transposed(w: torch.Tensor, layout: Layout) -> torch.Tensor:
    return w.transpose(-1, -2) if layout == "out_in" else w


_BACKENDS = ("auto", "torch", "triton", "bnb")


def nf4_chunked_weights(q: NF4Tensor, layout: Layout, backend: Backend = "auto"
                        ) -> ChunkedWeights:
    """An NF4 stack as :class:`~groupmoe.lora.chunked.ChunkedWeights` (source ``"nf4"``):
    its tensors, and shape, blocksizes, layout and dequantize backend as integers."""
    parts = (q.packed, q.absmax) + ((q.absmax2, q.code2, q.offset) if q.nested else ())
    meta = (*q.shape, q.blocksize, q.blocksize2, int(layout == "out_in"),
            _BACKENDS.index(backend))
    e, d0, d1 = q.shape
    return ChunkedWeights("nf4", parts, meta, (e, d1, d0) if layout == "out_in" else (e, d0, d1))


def _nf4_source(tensors, meta, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    *shape, blocksize, blocksize2, out_in, backend = meta
    nested = dict(zip(("absmax2", "code2", "offset"), tensors[2:]))
    q = NF4Tensor(tensors[0], tensors[1], torch.Size(shape), dtype, blocksize,
                  blocksize2=blocksize2, **nested)
    w = dequantize_nf4_experts(q, start, stop, dtype, _BACKENDS[backend])
    return _transposed(w, "out_in" if out_in else "in_out")


register_weight_source("nf4", _nf4_source)


class QuantizedGroupedExperts(nn.Module):
    """``E`` gated MLP experts whose weights are frozen NF4 stacks (bitsandbytes layout).

    Args:
        gate_up, down: :class:`NF4Tensor` stacks, ``[E, 2I, H]`` / ``[E, H, I]`` for
            ``layout="out_in"`` (``nn.Linear``/bitsandbytes/Qwen3-MoE) or ``[E, H, 2I]`` /
            ``[E, I, H]`` for ``"in_out"`` (gpt-oss).
        gate_up_bias, down_bias: optional frozen per-expert biases ``[E, 2I]``, ``[E, H]``.
        activation: ``"swiglu"`` or ``"gptoss"``.
        dequant: ``"chunked"`` (a range of experts at a time; least memory), ``"recompute"``
            (whole stacks, rebuilt in backward) or ``"cache"`` (whole stacks kept).
        dequant_chunk_bytes: with ``"chunked"``, the most bytes of one stack dequantized at
            once (rounded down to whole experts, at least one expert); ``None``: whole stacks,
            one at a time (no host sync).
        compute_dtype: dtype of the dequantized stacks and the GEMMs.
        save: ``"h"`` keeps the gate_up output for backward, ``"none"`` recomputes it (with
            ``"chunked"``, or without LoRA).
        lora_rank, lora_alpha, lora_targets: add trainable grouped LoRA (rank 0: none).
        backend: dequantize backend (see :func:`dequantize_nf4`).
    """

    def __init__(self, gate_up: NF4Tensor, down: NF4Tensor, activation: str = "swiglu",
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                 layout: Layout = "out_in", dequant: DequantMode = "chunked",
                 dequant_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
                 compute_dtype: torch.dtype = torch.bfloat16, save: SaveMode = "h",
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] = ("gate_up", "down"), backend: Backend = "auto"):
        super().__init__()
        check(layout in ("out_in", "in_out"), f"QuantizedGroupedExperts: bad layout {layout!r}")
        check(dequant in DEQUANT_MODES,
              f"QuantizedGroupedExperts: dequant must be one of {DEQUANT_MODES}, got {dequant!r}")
        check(dequant_chunk_bytes is None or dequant_chunk_bytes >= 1,
              f"QuantizedGroupedExperts: dequant_chunk_bytes must be >= 1 or None, got "
              f"{dequant_chunk_bytes}")
        check(len(gate_up.shape) == 3 and len(down.shape) == 3,
              "QuantizedGroupedExperts: gate_up and down must be 3-D [E, ., .] NF4 stacks")
        self.layout, self.dequant, self.save, self.backend = layout, dequant, save, backend
        self.compute_dtype, self.dequant_chunk_bytes = compute_dtype, dequant_chunk_bytes
        self.activation = get_activation(activation)
        e, h, two_i = _transposed(torch.empty(gate_up.shape, device="meta"), layout).shape
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, two_i // 2
        self.gate_up_q, self.down_q = gate_up, down
        self.register_buffer("gate_up_bias", gate_up_bias)
        self.register_buffer("down_bias", down_bias)
        self.lora = ExpertLoRAModule(e, h, two_i // 2, lora_rank, lora_alpha, lora_targets,
                                     device=gate_up.device) if lora_rank else None

    @classmethod
    def from_dense(cls, w_gate_up: torch.Tensor, w_down: torch.Tensor, nested: bool = False,
                   layout: Layout = "in_out", **kwargs) -> QuantizedGroupedExperts:
        """Quantize dense stacks (e.g. a :class:`~groupmoe.nn.GroupedExperts`' ``gate_up``/
        ``down``, ``[E, in, out]``) to NF4."""
        return cls(quantize_nf4(w_gate_up.detach(), nested=nested),
                   quantize_nf4(w_down.detach(), nested=nested), layout=layout, **kwargs)

    def _apply(self, fn, recurse=True):
        # NF4 stacks are not parameters/buffers: move them with the module
        probe = fn(torch.empty(0, device=self.gate_up_q.device))
        self.gate_up_q, self.down_q = self.gate_up_q.to(probe.device), self.down_q.to(
            probe.device)
        return super()._apply(fn, recurse)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(gate_up, down)`` in ``compute_dtype``, ``[E, in, out]`` views."""
        w1 = dequantize_nf4(self.gate_up_q, self.compute_dtype, self.backend)
        w2 = dequantize_nf4(self.down_q, self.compute_dtype, self.backend)
        return _transposed(w1, self.layout), _transposed(w2, self.layout)

    def chunked_weights(self, which: str) -> ChunkedWeights:
        """The ``gate_up`` or ``down`` stack as the chunked op takes it (``[E, in, out]``)."""
        q = self.gate_up_q if which == "gate_up" else self.down_q
        return nf4_chunked_weights(q, self.layout, self.backend)

    def expert_weights(self, which: str, start: int, stop: int) -> torch.Tensor:
        """Dequantized ``gate_up`` or ``down`` of experts ``[start, stop)``, ``[n, in, out]``."""
        return self.chunked_weights(which).experts(start, stop, self.compute_dtype)

    def experts_per_chunk(self) -> int:
        """Experts per dequantized range under ``dequant_chunk_bytes`` (at least one; all of
        them for ``None``)."""
        if self.dequant_chunk_bytes is None:
            return self.num_experts
        per_expert = max(q.numel // self.num_experts for q in (self.gate_up_q, self.down_q))
        size = per_expert * torch.empty(0, dtype=self.compute_dtype).element_size()
        return max(1, self.dequant_chunk_bytes // size)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor,
                lora: ExpertLoRA | None = None, *, check_ids: bool = True) -> torch.Tensor:
        """``x [T, H]``, ``expert_ids [T, k]``, ``gate_weights [T, k]`` -> ``[T, H]``.

        ``lora`` overrides the module's own adapters (e.g. factors read from peft).
        ``check_ids=False`` skips the ids' range check and its device sync, for ids in range by
        construction (a router's ``topk``), as :meth:`groupmoe.nn.GroupedExperts.forward`.
        """
        check(x.dtype == self.compute_dtype,
              f"QuantizedGroupedExperts: x is {x.dtype}, compute dtype is {self.compute_dtype}")
        check(x.dim() == 2 and x.shape[1] == self.hidden_size,
              lambda: f"QuantizedGroupedExperts: x must be [tokens, {self.hidden_size}], got "
              f"{tuple(x.shape)}")
        routing = build_routing(expert_ids, self.num_experts, check_ids=check_ids)
        if lora is None and self.lora is not None:
            lora = self.lora.factors()
        b1 = None if self.gate_up_bias is None else self.gate_up_bias.to(x.dtype)
        b2 = None if self.down_bias is None else self.down_bias.to(x.dtype)
        if self.dequant == "chunked":
            if lora is not None:
                lora.check(self.num_experts, self.hidden_size, self.intermediate_size,
                           "QuantizedGroupedExperts")
            return chunked_expert_mlp(x, routing, gate_weights, self.chunked_weights("gate_up"),
                                      self.chunked_weights("down"), self.experts_per_chunk(),
                                      self.activation, lora, b1, b2, self.save)
        w1, w2 = self.dense_weights()
        ctx = contextlib.nullcontext()
        if self.dequant == "recompute":
            ctx = recompute_saved([
                (w1, lambda: dequantize_nf4(self.gate_up_q, self.compute_dtype, self.backend)),
                (w2, lambda: dequantize_nf4(self.down_q, self.compute_dtype, self.backend)),
            ])
        with ctx:
            if lora is None:
                return expert_mlp(x, routing, gate_weights, w1, w2, b1, b2, self.activation,
                                  save=self.save)
            return expert_mlp_lora(x, routing, gate_weights, w1, w2, lora, b1, b2,
                                   self.activation)
