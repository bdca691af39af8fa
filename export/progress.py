"""Step-by-step progress with elapsed time, on stderr so that --json stdout stays clean."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Steps:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str):
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 3)
        self.log(f"{name} done in {dt:.1f}s")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
