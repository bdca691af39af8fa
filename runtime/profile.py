"""Measurement helpers shared by the benchmark and the profiler: medians after warm-up, peak RSS sampling."""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _high_water_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak RSS while the ``with`` block runs; ``.peak`` in bytes.

    On Linux the kernel's own high-water mark, reset on entry (``/proc/self/clear_refs``) and read on exit: exact,
    and with no thread running beside what is measured (a sampler thread waking every 2 ms took ~4 % off the
    decoder's step time, since ONNX Runtime releases the GIL while it runs). The reset is process-wide: a peak read
    later through ``getrusage`` no longer covers what came before the block. Elsewhere RSS is sampled on a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._kernel = False

    def __enter__(self):
        self.peak = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak resident set size to the current one
            self._kernel = _high_water_bytes() is not None
        except OSError:
            self._kernel = False
        if not self._kernel:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._kernel:
            self.peak = max(self.peak, _high_water_bytes() or 0, rss_bytes())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")
