"""A progress bar with an ETA for long runs: tqdm where it is installed, otherwise a plain line every few seconds.

tqdm stays out of the runtime's base dependencies: the base install is what an edge box runs, and a progress line
is not worth a package there; it is in the ``export`` extra and most Python environments, so users usually get it.
The fallback prints whole lines (no carriage returns), which also reads well in CI logs and ``nohup`` files.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """``done/total (pct) rate, elapsed, ETA`` on its own line at most every ``every`` seconds, and at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream=None, every: float = 5.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.every = every
        self.n = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta_text = _clock(eta) if eta == eta else "?"
        print(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {rate:.2f} {self.unit}/s, "
              f"elapsed {_clock(elapsed)}, ETA {eta_text}", file=self.stream, flush=True)

    def close(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class _Tqdm:
    def __init__(self, total: int, desc: str, unit: str, stream=None):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream or sys.stderr, dynamic_ncols=True,
                        smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

    def write(self, text: str) -> None:  # a message above the bar, not through it
        self._tqdm.write(text, file=self.bar.fp)


def progress(total: int, desc: str, unit: str = "it", stream=None, plain: bool = False):
    """A bar with ``update(n)``, ``write(text)`` and ``close()``."""
    if not plain:
        try:
            return _Tqdm(total, desc, unit, stream)
        except ImportError:
            pass
    return LineProgress(total, desc, unit, stream)
