"""Timing and peak-memory measurement shared by the benchmarks.

Time: one untimed warm-up call per function, then rounds of one timed call per function, the functions
of a comparison interleaved so that load from other processes hits all of them alike. Rounds go on
until ``min_time`` seconds and ``min_reps`` rounds have passed (at most ``max_reps``; only 2 rounds when a
warm-up call took over ``long_call`` seconds, which keeps the VOC-sized CPU runs within minutes). CUDA
is synchronised around every call. Reported: the fastest call (the least disturbed by other work on a
shared machine) and the spread (max - min) / min.

Peak memory is the extra memory a call needs on top of what exists before it (model, inputs, optimiser
state, caches filled by the warm-up), the largest over the timed calls:

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call.
- CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) minus its resident
  size (``VmRSS``) before the call. The mark is reset first by writing 5 to ``/proc/self/clear_refs``
  (Linux >= 4.0), after ``gc`` and glibc's ``malloc_trim`` returned freed heap pages, so memory left over
  from earlier calls neither counts nor hides. ``None`` where Linux does not allow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Measurement:
    """The result of :meth:`Meter.compare` for one function."""

    seconds: float  # fastest call
    spread: float  # (max - min) / min over the timed calls
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once only
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only


def _release_freed_memory() -> None:
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _max_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if len(known) == len(values) else None


class Meter:
    """Times callables on ``device`` with the policy of the module docstring."""

    def __init__(self, device: torch.device, min_time: float, min_reps: int, max_reps: int = 50,
                 long_call: float = 5.0) -> None:
        self.device = device
        self.min_time = min_time
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.long_call = long_call

    def sync(self) -> None:
        """Wait for queued CUDA work, so that a timer read afterwards includes it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], warmup: bool = True, reps: int | None = None) -> Measurement:
        """Time one function; see :meth:`compare`."""
        return self.compare({"fn": fn}, warmup, reps)["fn"]

    def compare(self, fns: dict[str, Callable[[], object]], warmup: bool = True, reps: int | None = None,
                no_memory: Collection[str] = ()) -> dict[str, Measurement]:
        """Time the functions in interleaved rounds. ``reps`` fixes the number of rounds (else the policy
        decides). The functions in ``no_memory`` get no peak (their work runs in other processes, which
        this process's numbers do not see)."""
        min_reps = self.min_reps
        for fn in fns.values() if warmup else ():
            t0 = time.perf_counter()
            fn()
            self.sync()
            if time.perf_counter() - t0 > self.long_call:
                min_reps = min(min_reps, 2)
        times: dict[str, list[float]] = {name: [] for name in fns}
        peaks: dict[str, list[int | None]] = {name: [] for name in fns}
        began = time.perf_counter()
        rounds = 0
        while True:
            for name, fn in fns.items():
                start = None if name in no_memory else self._start_peak()
                t0 = time.perf_counter()
                fn()
                self.sync()
                times[name].append(time.perf_counter() - t0)
                peaks[name].append(self._peak(start))
            rounds += 1
            if reps is not None:
                if rounds >= reps:
                    break
            elif rounds >= self.max_reps or (rounds >= min_reps and time.perf_counter() - began >= self.min_time):
                break
        return {name: Measurement(min(t), (max(t) - min(t)) / min(t), rounds, _max_or_none(peaks[name]))
                for name, t in times.items()}

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
