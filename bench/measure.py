"""Timing and peak-memory measurement shared by the benchmarks.

Time: after ``warmup`` untimed calls, repeat until ``min_time`` seconds and ``min_reps`` calls have passed
(at most ``max_reps``), synchronising CUDA around every call; report the median and the relative spread.

Peak memory is the extra memory the timed calls need on top of what already exists before them (model,
inputs, optimiser state, caches filled by the warm-up):

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the calls.
- CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) minus its resident
  size (``VmRSS``) before the calls. The mark is reset first by writing 5 to ``/proc/self/clear_refs``
  (Linux >= 4.0), after ``gc`` and glibc's ``malloc_trim`` returned freed heap pages, so memory left over
  from earlier benchmarks in this process neither counts nor hides. ``None`` where Linux does not allow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Measurement:
    seconds: float  # median seconds per call
    spread: float  # (max - min) / median over the timed calls
    reps: int
    peak_bytes: int | None  # extra memory at the peak, see the module docstring


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Meter:
    """Times callables on ``device`` with the repetition policy of the module docstring."""

    def __init__(self, device: torch.device, min_time: float, min_reps: int, max_reps: int = 50) -> None:
        self.device = device
        self.min_time = min_time
        self.min_reps = min_reps
        self.max_reps = max_reps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], warmup: int = 1, reps: int | None = None,
                memory: bool = True) -> Measurement:
        """Time ``fn()``; ``reps`` fixes the number of timed calls (else the policy decides). ``memory=False``
        skips the peak (work done in other processes, which this process's numbers do not see)."""
        for _ in range(warmup):
            fn()
        self.sync()
        start_peak = self._start_peak() if memory else None
        times: list[float] = []
        began = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            n = len(times)
            if reps is not None:
                if n >= reps:
                    break
            elif n >= self.max_reps or (n >= self.min_reps and time.perf_counter() - began >= self.min_time):
                break
        median = statistics.median(times)
        return Measurement(median, (max(times) - min(times)) / median, len(times), self._peak(start_peak))

    def _start_peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        _release_freed_memory()
        rss = _status_kib("VmRSS")
        return rss * 1024 if rss is not None and _reset_rss_peak() else None

    def _peak(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - start
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(hwm * 1024 - start, 0)
