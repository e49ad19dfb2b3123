"""Speed, memory, load and FLOP meters for the benchmark harness.

- `Throughput`: wall time of a block and items per second (CUDA is synchronised at both ends).
- `PeakMemory` (and the `peak_memory(device)` context manager yielding a dict): extra memory a block needed at its peak. CUDA: the caching allocator's peak
  (`torch.cuda.max_memory_allocated` after a reset) minus what was allocated at entry. CPU: the
  process's resident set size (RSS) sampled from /proc/self/statm by a background thread every
  `interval` seconds (5 ms), maximum minus the RSS at entry. `ru_maxrss` is not used on Linux
  because it is the maximum over the whole process lifetime, so a block after a bigger one would
  read 0 growth; a spike shorter than the interval can be missed. Freed heap memory that the C
  allocator kept from earlier work would hide growth, so on glibc the meter returns it to the OS
  (`malloc_trim`) at entry and fixes the mmap threshold (large tensors get their own pages, given
  back when freed) — without that a second model sampled in the same process could read 0.
- `machine_load()`: /proc/loadavg (or os.getloadavg) and the CPU count, to print next to timings.
- `count_flops(fn)`: FLOPs of one call, from torch's FlopCounterMode (matmul/conv/attention ops).
- `counting_calls(obj, name)`: how often a method is called inside a block (forward passes of a
  generator: `counting_calls(model, "forward_step")`); `median_seconds(fn)`: a repeated timing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


def _sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work so wall time covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """`with Throughput(num_items, device) as t: ...` then t.seconds, t.items_per_second, t.seconds_per_item."""

    def __init__(self, num_items: int = 1, device: str | torch.device | None = None) -> None:
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        self.num_items = num_items
        self.device = torch.device(device) if device is not None else None
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "Throughput":
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._start

    @property
    def items_per_second(self) -> float:
        """Items per wall-clock second (0 when nothing was timed)."""
        return self.num_items / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_item(self) -> float:
        """Wall-clock seconds per item (the latency of one item when num_items is a batch, divide yourself)."""
        return self.seconds / self.num_items if self.num_items else 0.0

    def as_dict(self) -> dict[str, float]:
        """seconds, items, items_per_second."""
        return {"seconds": self.seconds, "items": self.num_items, "items_per_second": self.items_per_second}


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc/self/statm), or None where unavailable."""
    try:
        with open(_STATM) as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    """Lifetime peak RSS from getrusage (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_free_heap() -> None:
    """Give freed C-heap memory back to the OS (glibc only) so RSS growth measures new allocations."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # a fixed threshold: glibc would otherwise raise it after frees
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): measure as is
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak_bytes: memory growth at the block's peak over its start.

    m.kind says what was measured: "cuda_allocated" (allocator peak minus allocated at entry),
    "rss_sampled" (RSS sampled every `interval` s, max minus entry), or "rss_lifetime" (no /proc:
    growth of ru_maxrss, 0 when an earlier block peaked higher). m.baseline_bytes is the entry value.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.kind = ""
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            self.kind = "cuda_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return self
        release_free_heap()
        rss = current_rss_bytes()
        if rss is None:
            self.kind = "rss_lifetime"
            self.baseline_bytes = _maxrss_bytes()
            return self
        self.kind = "rss_sampled"
        self.baseline_bytes = self._max = rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="arzoo-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes)
        elif self.kind == "rss_lifetime":
            self.peak_bytes = max(0, _maxrss_bytes() - self.baseline_bytes)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            last = current_rss_bytes() or 0  # the block may end at its peak
            self.peak_bytes = max(0, max(self._max, last) - self.baseline_bytes)

    @property
    def peak_mib(self) -> float:
        """peak_bytes in MiB."""
        return self.peak_bytes / 2**20

    def as_dict(self) -> dict[str, Any]:
        """peak_bytes, peak_mib (= peak_mb, both in MiB), baseline_bytes, kind."""
        return {
            "peak_bytes": self.peak_bytes,
            "peak_mib": self.peak_mib,
            "peak_mb": self.peak_mib,  # alias used by the harness (MiB, 2**20 bytes)
            "baseline_bytes": self.baseline_bytes,
            "kind": self.kind,
        }


@contextmanager
def peak_memory(device: str | torch.device = "cpu", interval: float = 0.005) -> Iterator[dict[str, Any]]:
    """`with peak_memory(device) as mem: ...`; afterwards mem holds PeakMemory.as_dict() (peak_mb in MiB, kind)."""
    result: dict[str, Any] = {}
    meter = PeakMemory(device, interval)
    with meter:
        yield result
    result.update(meter.as_dict())


def machine_load() -> dict[str, Any]:
    """Load averages over 1/5/15 minutes, runnable/total tasks (Linux) and the CPU count."""
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/loadavg") as fh:
            fields = fh.read().split()
        out.update(load1=float(fields[0]), load5=float(fields[1]), load15=float(fields[2]), tasks=fields[3])
    except (OSError, ValueError, IndexError):
        try:
            out["load1"], out["load5"], out["load15"] = os.getloadavg()
        except OSError:
            out["load1"] = out["load5"] = out["load15"] = None
    return out


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of `fn(*args, **kwargs)` as torch's FlopCounterMode counts them (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@contextmanager
def counting_calls(obj: Any, name: str) -> Iterator[list[int]]:
    """`with counting_calls(model, "forward_step") as calls: ...`; then calls[0] is how often it ran."""
    calls = [0]
    original = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, name, counted)  # an instance attribute shadows the method only while counting
    try:
        yield calls
    finally:
        delattr(obj, name)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
