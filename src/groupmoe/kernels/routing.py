"""Routing metadata in three small launches: the stable sort of the ``[T, k]`` expert ids by
expert, its inverse, token and expert of each sorted row, counts and offsets.

The flat pairs are cut into tiles. (1) each tile counts its experts; (2) one program turns the
``[tiles, E]`` counts into where each (tile, expert) run starts in the sorted order; (3) each
tile sorts its pairs by ``(expert, position)`` in registers and writes every pair to its run.
Integer-exact and identical to ``torch.sort(..., stable=True)``; no atomics, no host sync. It
replaces ten torch launches (sort, scatter, cumsum, ...) whose host time dominated routing at
fine-tuning token counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# experts held in registers by the scan (one [chunk, E] block at a time); more take torch
MAX_EXPERTS = 4096


@triton.jit
def _tile_counts_kernel(ids_ptr, counts_ptr, n, num_experts,
                        BLOCK: tl.constexpr, BINS: tl.constexpr):
    tile = tl.program_id(0)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    # lanes past the end count in bin num_experts, which is not stored (BINS > num_experts)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=num_experts).to(tl.int32)
    ids = tl.where((ids < 0) | (ids > num_experts), num_experts, ids)  # never out of bounds
    hist = tl.histogram(ids, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + tile * num_experts + bins, hist, mask=bins < num_experts)


@triton.jit
def _scan_kernel(tile_counts_ptr, base_ptr, counts_ptr, offsets_ptr, tiles, num_experts,
                 CHUNK: tl.constexpr, EXPERTS: tl.constexpr):
    cols = tl.arange(0, EXPERTS)
    col_ok = cols < num_experts
    total = tl.zeros((EXPERTS,), dtype=tl.int32)
    for r0 in range(0, tiles, CHUNK):  # pass 1: rows per expert
        rows = r0 + tl.arange(0, CHUNK)
        m = (rows[:, None] < tiles) & col_ok[None, :]
        total += tl.sum(tl.load(tile_counts_ptr + rows[:, None] * num_experts + cols[None, :],
                                mask=m, other=0), 0)
    start = tl.cumsum(total, 0) - total  # first sorted row of each expert
    tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
    tl.store(offsets_ptr + cols, start + total, mask=col_ok)
    above = start  # pass 2: + rows of the expert in earlier tiles, - earlier experts in the tile
    for r0 in range(0, tiles, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        m = (rows[:, None] < tiles) & col_ok[None, :]
        c = tl.load(tile_counts_ptr + rows[:, None] * num_experts + cols[None, :], mask=m,
                    other=0)
        base = above[None, :] + (tl.cumsum(c, 0) - c) - (tl.cumsum(c, 1) - c)
        tl.store(base_ptr + rows[:, None] * num_experts + cols[None, :], base, mask=m)
        above += tl.sum(c, 0)


@triton.jit
def _place_kernel(ids_ptr, base_ptr, order_ptr, inverse_ptr, token_ptr, expert_ptr, n,
                  num_experts, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = tile * BLOCK + lane
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=num_experts).to(tl.int32)
    # unique keys (< (MAX_EXPERTS + 1) * 4096, int32): sorted, the tile's pairs are grouped by
    # expert in their original order
    key = tl.sort(ids * BLOCK + lane)
    expert = key // BLOCK
    pair = tile * BLOCK + (key % BLOCK)
    valid = (key >= 0) & (expert < num_experts)
    # the tile's sorted position + where its (tile, expert) run starts, less the tile's
    # earlier experts (folded into base by the scan)
    dest = tl.load(base_ptr + tile * num_experts + expert, mask=valid, other=0) + lane
    dest = dest.to(tl.int64)
    pair = pair.to(tl.int64)
    tl.store(order_ptr + dest, pair, mask=valid)
    tl.store(inverse_ptr + pair, dest, mask=valid)
    tl.store(token_ptr + dest, pair // TOP_K, mask=valid)
    tl.store(expert_ptr + dest, expert.to(tl.int64), mask=valid)


def _tile(n: int) -> int:
    # about 64 tiles at 64k pairs; sorts of at most 4096 keys per program
    return max(256, min(4096, triton.next_power_of_2(max(n // 64, 1))))


def routing_metadata(expert_ids: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, ...]:
    """``(order, inverse, token_index, expert_index, counts, offsets)`` of ``[T, k]`` ids, as
    :func:`groupmoe.ops.build_routing` defines them (int64, counts int64, offsets int32). Ids
    must be in ``[0, num_experts)`` (others are left out of the sort, never read or written out
    of bounds); ``num_experts <= MAX_EXPERTS``."""
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    order, inverse, token, expert = (torch.empty(n, dtype=torch.long, device=dev)
                                     for _ in range(4))
    if n == 0:
        return (order, inverse, token, expert,
                torch.zeros(num_experts, dtype=torch.long, device=dev),
                torch.zeros(num_experts, dtype=torch.int32, device=dev))
    counts = torch.empty(num_experts, dtype=torch.long, device=dev)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block = _tile(n)
    tiles = triton.cdiv(n, block)
    tile_counts = torch.empty(tiles, num_experts, dtype=torch.int32, device=dev)
    base = torch.empty_like(tile_counts)
    flat = flat.contiguous()
    _tile_counts_kernel[(tiles,)](flat, tile_counts, n, num_experts, BLOCK=block,
                                  BINS=triton.next_power_of_2(num_experts + 1))
    experts = triton.next_power_of_2(num_experts)
    _scan_kernel[(1,)](tile_counts, base, counts, offsets, tiles, num_experts,
                       CHUNK=max(1, min(64, 8192 // experts)), EXPERTS=experts,
                       num_warps=8)
    _place_kernel[(tiles,)](flat, base, order, inverse, token, expert, n, num_experts,
                            TOP_K=top_k, BLOCK=block, num_warps=8)
    return order, inverse, token, expert, counts, offsets
