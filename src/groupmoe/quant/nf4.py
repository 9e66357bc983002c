"""NF4 4-bit weights in the bitsandbytes layout, quantize and dequantize of whole expert stacks.

Layout (bitsandbytes ``quantize_4bit(quant_type="nf4")``, checked against bitsandbytes 0.50):

* ``packed``: ``uint8 [ceil(n/2), 1]``, two 4-bit codes per byte over the row-major flattened
  tensor, the first element in the high nibble;
* ``absmax``: one fp32 scale per block of ``blocksize`` (64) consecutive elements, the block's
  absolute maximum; value = ``NF4[code] * absmax`` computed in fp32, cast once;
* nested (bitsandbytes' ``compress_statistics``/double quant): ``absmax - offset`` (``offset`` =
  its mean) quantized to ``uint8`` codes of bitsandbytes' signed dynamic map with fp32 scales per
  block of 256; dequantized as ``code2[q] * absmax2 + offset`` in fp32.

Because the bytes are row-major, a whole ``[E, out, in]`` expert stack is one tensor and the
concatenation of per-expert tensors is exact: all experts dequantize in one call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..ops.checks import check

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
Backend = Literal["auto", "torch", "triton", "bnb"]


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def dynamic_code(device: str | torch.device = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), sorted, fp32 [256]."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    code = torch.tensor(data, dtype=torch.float32)
    return code.sort().values.to(device)


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor quantized to NF4 in bitsandbytes' layout (see module docstring).

    ``absmax`` is fp32 ``[blocks]``, or ``uint8 [blocks]`` when ``nested`` with ``absmax2``
    (fp32 ``[ceil(blocks/256)]``), ``code2`` (fp32 ``[256]``) and ``offset`` (fp32 scalar).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256

    def __post_init__(self):
        n = self.numel
        check(self.blocksize in BLOCKSIZES,
              lambda: f"NF4Tensor: blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        check(self.packed.dtype == torch.uint8 and self.packed.numel() == (n + 1) // 2,
              lambda: f"NF4Tensor: packed must be uint8 with {(n + 1) // 2} bytes for shape "
              f"{tuple(self.shape)}, got {self.packed.dtype} with {self.packed.numel()}")
        blocks = -(-n // self.blocksize)
        check(self.absmax.numel() == blocks,
              lambda: f"NF4Tensor: absmax must hold {blocks} blocks, got {self.absmax.numel()}")
        if self.nested:
            check(self.absmax.dtype == torch.uint8 and self.code2 is not None
                  and self.offset is not None,
                  "NF4Tensor: nested absmax needs uint8 absmax, absmax2, code2 and offset")
        else:
            check(self.absmax.dtype == torch.float32,
                  lambda: f"NF4Tensor: absmax must be float32, got {self.absmax.dtype}")

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> NF4Tensor:
        """Move every component to ``device``."""
        def mv(t):
            return None if t is None else t.to(device)
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax),
                       absmax2=mv(self.absmax2), code2=mv(self.code2), offset=mv(self.offset))

    def nbytes(self) -> int:
        """Bytes held by this tensor (packed codes and scales)."""
        parts = (self.packed, self.absmax, self.absmax2, self.code2, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Tensor:
        """Wrap bitsandbytes' packed weight and ``QuantState`` (no copy, no conversion)."""
        check(quant_state.quant_type == "nf4",
              f"NF4Tensor.from_bnb: quant_type must be 'nf4', got {quant_state.quant_type!r}")
        if packed.dtype != torch.uint8:  # bnb's quant_storage may be any dtype; bytes are the same
            packed = packed.view(torch.uint8)
        kw = {}
        if quant_state.nested:
            s2 = quant_state.state2
            kw = dict(absmax2=s2.absmax, code2=s2.code, offset=quant_state.offset,
                      blocksize2=s2.blocksize)
        return cls(packed=packed, absmax=quant_state.absmax, shape=torch.Size(quant_state.shape),
                   dtype=quant_state.dtype, blocksize=quant_state.blocksize, **kw)

    def to_bnb(self):
        """``(packed, QuantState)`` for bitsandbytes' ``dequantize_4bit`` (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=_nf4_code(self.device),
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                           offset=self.offset, state2=state2)
        return self.packed, state


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``flat`` to whole blocks; return ``(blocks [B, blocksize], absmax [B])``."""
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    return blocks, blocks.abs().amax(1)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` (ties to the lower one)."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(scaled, mids, right=False)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, nested: bool = False) -> NF4Tensor:
    """Quantize ``w`` (any shape, 16/32-bit float) to NF4 in the bitsandbytes layout.

    ``nested=True`` also quantizes the absmax like bitsandbytes' ``compress_statistics``.
    Meant for tests and for quantizing checkpoints without bitsandbytes.
    """
    check(w.dtype in (torch.float32, torch.bfloat16, torch.float16),
          f"quantize_nf4: w must be fp32/bf16/fp16, got {w.dtype}")
    check(blocksize in BLOCKSIZES, f"quantize_nf4: blocksize must be one of {BLOCKSIZES}")
    n = w.numel()
    blocks, absmax = _blockwise_absmax(w.detach().reshape(-1).float(), blocksize)
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    q = _nearest(scaled, _nf4_code(w.device)).to(torch.uint8)
    if n % 2:  # bitsandbytes pads an odd count with the code of 0.0
        q = torch.nn.functional.pad(q, (0, 1), value=7)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    t = NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    return nest_absmax(t) if nested else t


def nest_absmax(t: NF4Tensor) -> NF4Tensor:
    """``t`` with its fp32 absmax quantized like bitsandbytes' ``compress_statistics``
    (so a stack quantized in chunks can be nested once, over all its scales)."""
    check(not t.nested, "nest_absmax: the absmax is nested already")
    absmax = t.absmax
    offset = absmax.mean()
    centred = absmax - offset
    blocks2, absmax2 = _blockwise_absmax(centred, 256)
    code2 = dynamic_code(absmax.device)
    scaled2 = (blocks2 / absmax2.unsqueeze(1)).reshape(-1)[: centred.numel()]
    scaled2 = scaled2.nan_to_num(nan=-1.0)  # an all-zero block (0/0): code 0, as bitsandbytes
    qabs = _nearest(scaled2, code2).to(torch.uint8)
    return replace(t, absmax=qabs, absmax2=absmax2, code2=code2, offset=offset)


def absmax_fp32(t: NF4Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The fp32 per-block scales of blocks ``[start, stop)`` (all by default), dequantizing the
    nested absmax when needed (small)."""
    stop = t.absmax.numel() if stop is None else stop
    if not t.nested:
        return t.absmax[start:stop]
    vals = t.code2[t.absmax[start:stop].long()]
    scale2 = t.absmax2[torch.arange(start, stop, device=t.device) // t.blocksize2]
    return vals * scale2 + t.offset  # product, then a separate add (no FMA), as bitsandbytes


def _dequant_torch(t: NF4Tensor, dtype: torch.dtype, absmax: torch.Tensor) -> torch.Tensor:
    b = t.packed.reshape(-1)
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1).long()
    vals = _nf4_code(t.device)[codes]
    pad = (-vals.numel()) % t.blocksize
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, t.blocksize)
    out = (vals * absmax.unsqueeze(1)).reshape(-1)[: t.numel]
    return out.to(dtype).view(t.shape)


def _dequant_bnb(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = t.to_bnb()
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state)


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when its binary is missing
        return False
    return True


def _resolve_backend(device: torch.device, backend: Backend) -> str:
    check(backend in ("auto", "torch", "triton", "bnb"),
          lambda: f"dequantize_nf4: unknown backend {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from . import nf4_triton
        return "triton" if nf4_triton.available() else ("bnb" if _bnb_available() else "torch")
    return "torch"


def _out_dtype(t: NF4Tensor, dtype: torch.dtype | None) -> torch.dtype:
    dtype = dtype or t.dtype
    check(dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
          lambda: f"dequantize_nf4: dtype must be a float type, got {dtype}")
    return dtype


def _nested(t: NF4Tensor):
    """The nested scales as the Triton kernel takes them, or ``None``."""
    return (t.absmax2, t.code2, t.offset, t.blocksize2) if t.nested else None


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None,
                   backend: Backend = "auto") -> torch.Tensor:
    """Dequantize a whole NF4 tensor (e.g. all experts of a stack) in one call.

    Args:
        dtype: output dtype (default: the dtype recorded at quantization).
        backend: ``"torch"`` (any device), ``"triton"`` (groupmoe's kernel, nested scales
            included, one launch; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"bnb"``
            (bitsandbytes' ``dequantize_4bit``) or ``"auto"``: Triton on CUDA when installed,
            else bitsandbytes on CUDA, else torch.
    Bit-exact with bitsandbytes' ``dequantize_4bit`` on every backend.
    """
    dtype = _out_dtype(t, dtype)
    backend = _resolve_backend(t.device, backend)
    if backend == "bnb":
        check(dtype != torch.float64, "dequantize_nf4: bitsandbytes has no float64 output")
        return _dequant_bnb(t, dtype)
    if backend == "triton":
        from .nf4_triton import dequantize_nf4_triton
        return dequantize_nf4_triton(t.packed, t.absmax, t.shape, t.blocksize, dtype,
                                     nested=_nested(t))
    return _dequant_torch(t, dtype, absmax_fp32(t))


def dequantize_nf4_experts(t: NF4Tensor, start: int, stop: int, dtype: torch.dtype | None = None,
                           backend: Backend = "auto") -> torch.Tensor:
    """``dequantize_nf4(t)[start:stop]`` (a range of experts of a stack) without dequantizing
    the rest: bit-identical to slicing the whole result.

    Only the 4-bit blocks covering the range are dequantized (at most two blocks more than the
    range when an expert's size is not a multiple of the blocksize).
    """
    check(len(t.shape) >= 1 and 0 <= start <= stop <= t.shape[0],
          lambda: f"dequantize_nf4_experts: bad range [{start}, {stop}) of {t.shape[0]} experts")
    dtype = _out_dtype(t, dtype)
    per = t.numel // t.shape[0] if t.shape[0] else 0
    first, last = start * per, stop * per  # element range
    b0, b1 = first // t.blocksize, -(-last // t.blocksize)
    e0 = b0 * t.blocksize  # first covered element (even: blocksize is even)
    n = min(b1 * t.blocksize, t.numel) - e0
    packed = t.packed.reshape(-1)[e0 // 2: e0 // 2 + (n + 1) // 2]
    backend = _resolve_backend(t.device, backend)
    if backend == "triton":  # the kernel indexes the whole stack's scales from block b0
        from .nf4_triton import dequantize_nf4_triton
        flat = dequantize_nf4_triton(packed, t.absmax, (n,), t.blocksize, dtype, block0=b0,
                                     nested=_nested(t))
    else:
        part = NF4Tensor(packed, absmax_fp32(t, b0, b1).contiguous(), torch.Size((n,)),
                         t.dtype, t.blocksize)
        flat = dequantize_nf4(part, dtype, backend)
    return flat[first - e0: last - e0].view(stop - start, *t.shape[1:])


def stack_nf4(parts: list[NF4Tensor]) -> NF4Tensor:
    """Concatenate same-shaped per-expert NF4 tensors into one ``[E, ...]`` stack (exact).

    Needs each part's element count to be a multiple of ``2 * blocksize`` so bytes and blocks
    line up. Nested parts (each with its own offset and second-level scales) are stored with
    their fp32 absmax in the stack.
    """
    check(len(parts) > 0, "stack_nf4: need at least one tensor")
    p0 = parts[0]
    check(all(p.shape == p0.shape and p.blocksize == p0.blocksize for p in parts),
          "stack_nf4: all parts must share shape and blocksize")
    check(p0.numel % (2 * p0.blocksize) == 0,
          f"stack_nf4: {p0.numel} elements per part is not a multiple of 2*blocksize")
    packed = torch.cat([p.packed.reshape(-1) for p in parts]).unsqueeze(1)
    absmax = torch.cat([absmax_fp32(p) for p in parts])
    return NF4Tensor(packed, absmax, torch.Size((len(parts), *p0.shape)), p0.dtype, p0.blocksize)
