"""Timing and memory measurement: CUDA events, medians after warm-up, peak extra bytes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_timer(device: torch.device) -> Callable[[], float]:
    """Start timing now; the returned function gives the elapsed ms (CUDA events on GPU, so
    it waits for the work queued so far; perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return stop
    t0 = time.perf_counter()
    return lambda: (time.perf_counter() - t0) * 1e3


def median_ms(step: Callable[[int], None], device: torch.device, warmup: int = 3,
              repeat: int = 20) -> float:
    """Median wall time of ``step(i)`` in ms (CUDA events on GPU, perf_counter on CPU).

    ``step`` receives the iteration number so it can pick fresh inputs each run.
    """
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    for i in range(repeat):
        stop = start_timer(device)
        step(warmup + i)
        times.append(stop())
    return statistics.median(times)


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory allocated by ``step`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def first_call_s(step: Callable[[int], None], device: torch.device) -> float:
    """Seconds of the first ``step(0)``: compilation, autotuning and allocator warm-up in."""
    sync(device)
    t0 = time.perf_counter()
    step(0)
    sync(device)
    return time.perf_counter() - t0


def held_bytes(forward: Callable[[], object], device: torch.device) -> int | None:
    """Memory a forward leaves allocated while its result lives: what its backward will need,
    the output included (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    result = forward()
    sync(device)
    held = torch.cuda.memory_allocated(device) - base
    del result
    return held
