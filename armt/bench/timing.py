"""Timing: warm-up, then the median of several runs; CUDA events on a GPU; peak device memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Timing:
    times_ms: list[float]  # one per timed run
    peak_bytes: int | None  # peak device memory allocated during the timed runs (None on CPU)
    result: Any  # what the last run returned
    held_bytes: int | None = None  # peak memory torch's caching allocator held (reserved) meanwhile

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; the device is idle between runs."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    peak = held = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device)
        held = torch.cuda.max_memory_reserved(device)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times, peak, result, held)
