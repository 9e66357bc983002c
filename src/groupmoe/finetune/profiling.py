"""``groupmoe finetune --profile``: where a training step's time goes, from torch.profiler over
a few steps after warm-up. Written to ``profile.txt`` in the run folder and printed.

What it says: the wall time of the profiled steps against the time the GPU kernels ran (busy
GPU; the rest is the GPU waiting for the host), the host syncs (each one stops the CPU from
running ahead of the GPU), and the largest GPU kernels and host ops. The next steps run under
cProfile (not under torch.profiler, whose own overhead would skew it): the Python functions that
take the host's time, for steps that are host-bound.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from ..bench.profile import kernel_ms
from ..bench.timing import sync

# host-side events that wait for the GPU or read a value back from it
SYNC_KEYS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
             "aten::_local_scalar_dense", "Memcpy DtoH")


def summarize(events, wall_s: float, steps: int, rows: int = 15) -> str:
    """A short report of a profiler's ``key_averages()`` over ``steps`` steps of ``wall_s``."""
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = kernel_ms(events) / steps
    wall_ms = wall_s * 1e3 / steps
    lines = [f"per step: {wall_ms:.1f} ms wall, GPU kernels {busy_ms:.1f} ms "
             f"({100 * busy_ms / wall_ms if wall_ms else 0:.0f}% busy)"]
    syncs = [e for e in events if any(k in e.key for k in SYNC_KEYS)]
    for e in syncs:
        lines.append(f"host sync: {e.key}: {e.count / steps:.0f} per step, "
                     f"{e.cpu_time_total / 1e3 / steps:.2f} ms")
    lines.append("largest GPU kernels (ms per step, calls per step):")
    for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:rows]:
        lines.append(f"  {e.self_device_time_total / 1e3 / steps:8.2f} {e.count / steps:6.0f}  "
                     f"{e.key[:110]}")
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    lines.append("largest host ops (self CPU ms per step, calls per step):")
    for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(f"  {e.self_cpu_time_total / 1e3 / steps:8.2f} {e.count / steps:6.0f}  "
                     f"{e.key[:110]}")
    return "\n".join(lines)


def summarize_python(stats: pstats.Stats, steps: int, rows: int = 20) -> str:
    """The Python functions with the most own time (``tottime``) in a cProfile of ``steps``."""
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(rows)
    body = out.getvalue().split("ncalls", 1)[-1].splitlines()[1:]
    head = f"host Python under cProfile, {steps} steps (seconds over all of them; ncalls tottime "
    return "\n".join([head + "percall cumtime percall function):", *[ln for ln in body if ln]])


class StepProfiler:
    """Profiles steps ``[first, first + steps)`` of a training loop with torch.profiler and the
    ``steps`` after them with cProfile: call :meth:`step_begin` and :meth:`step_end` around
    every step; :attr:`report` holds each summary when its window ends (the caller takes it
    and sets it back to ``None``)."""

    def __init__(self, device: torch.device, first: int = 3, steps: int = 2):
        self.device, self.first, self.steps = device, first, steps
        self.report: str | None = None
        self._prof = None
        self._python: cProfile.Profile | None = None
        self._t0 = 0.0

    def covers(self, step: int) -> bool:
        """Whether ``step`` runs under a profiler (its time is not representative)."""
        return self.first <= step < self.first + 2 * self.steps

    def step_begin(self, step: int) -> None:
        if step == self.first + self.steps:
            self._python = cProfile.Profile()
            self._python.enable()
        if step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        sync(self.device)
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        if self._python is not None and step == self.first + 2 * self.steps - 1:
            self._python.disable()
            self.report = summarize_python(pstats.Stats(self._python), self.steps)
            self._python = None
        if self._prof is None or step != self.first + self.steps - 1:
            return
        sync(self.device)
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.report = summarize(self._prof.key_averages(), wall, self.steps)
        self._prof = None
