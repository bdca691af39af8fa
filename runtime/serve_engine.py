"""The served bundles: every pipeline loaded once at start, a pool of them per bundle, shared caches, and admission
(``--max-concurrency`` run, ``--max-queue`` wait, the rest are refused at once). Family-neutral: a bundle is opened
by ``open_served`` and used through its one ``generate``."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlmprune.errors import VlmpruneError

from .reuse import ByteLRU, Reuse


def open_served(bundle: str | Path, **kwargs):
    """The one place the server opens a bundle: ``open_bundle`` (the family's hooks, one ``generate``)."""
    from .pipeline import open_bundle

    return open_bundle(bundle, **kwargs)


class Busy(Exception):
    """Every slot runs and the queue is full: HTTP 429 with Retry-After."""


@dataclass
class ServeConfig:
    bundles: list[str]
    max_concurrency: int = 1
    max_queue: int = 4
    cache_mb: float = 256.0
    request_timeout: float = 120.0
    threads: int | None = None
    provider: str | None = None
    verify: str = "quick"
    names: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.max_concurrency < 1:
            raise VlmpruneError(f"--max-concurrency {self.max_concurrency} must be at least 1", "give e.g. 1 or 2")
        if self.max_queue < 0:
            raise VlmpruneError(f"--max-queue {self.max_queue} is negative", "give 0 or more")
        if not self.cache_mb >= 0:
            raise VlmpruneError(f"--cache-mb {self.cache_mb} is negative", "give 0 (no caching) or more")
        if not self.request_timeout > 0:
            raise VlmpruneError(f"--request-timeout {self.request_timeout} must be positive", "give seconds, e.g. 120")


class ServedBundle:
    """One bundle: ``max_concurrency`` pipelines (each with its own decoder and sessions), opened and warmed once."""

    def __init__(self, name: str, path: str, config: ServeConfig, store: ByteLRU | None,
                 on_event: Callable[[str, bool], None] | None):
        self.name, self.path = name, path
        self.pipes = [open_served(path, verify=config.verify, threads=config.threads, provider=config.provider)
                      for _ in range(config.max_concurrency)]
        first = self.pipes[0]
        self.manifest = first.manifest
        self.buckets = sorted(self.manifest["vision"]["buckets"], key=lambda b: (b["keep"], b["k"]))
        self.max_context = int(self.manifest["decoder"]["max_context"])
        for pipe in self.pipes:
            pipe.reuse = Reuse(store, f"{Path(path).resolve()}|{pipe.decoder_kind}", on_event=on_event)
            for bucket in self.buckets:  # every session now, never inside a request
                pipe.prepare(bucket)
        self.pool: asyncio.Queue | None = None

    def keeps(self) -> list[float]:
        return sorted({float(b["keep"]) for b in self.buckets})


class Engine:
    def __init__(self, config: ServeConfig, on_event: Callable[[str, bool], None] | None = None):
        config.check()
        self.config = config
        self.store = ByteLRU(int(config.cache_mb * 2**20)) if config.cache_mb > 0 else None
        self.bundles: dict[str, ServedBundle] = {}
        for i, path in enumerate(config.bundles):
            name = config.names[i] if i < len(config.names) else Path(path).resolve().name
            if name in self.bundles:
                raise VlmpruneError(f"two bundles are named {name!r}", "serve folders with different names")
            self.bundles[name] = ServedBundle(name, path, config, self.store, on_event)
        self.executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="vlmprune-gen")
        self.inflight = 0  # running + waiting
        self.running = 0
        self._slots: asyncio.Semaphore | None = None

    def bind_loop(self) -> None:
        """The asyncio objects belong to the server's event loop: made when it starts."""
        self._slots = asyncio.Semaphore(self.config.max_concurrency)
        for b in self.bundles.values():
            b.pool = asyncio.Queue()
            for pipe in b.pipes:
                b.pool.put_nowait(pipe)

    def resolve(self, model: str | None, keep: float | None) -> tuple[ServedBundle, float | None]:
        """``model`` is ``NAME`` or ``NAME@KEEP`` (an explicit ``keep`` field wins); one bundle served: may be left out."""
        name, at_keep = (model or ""), None
        if "@" in name:
            name, _, text = name.rpartition("@")
            try:
                at_keep = float(text)
            except ValueError:
                raise VlmpruneError(f"model {model!r}: {text!r} after '@' is not a keep ratio",
                                    "write e.g. NAME@0.25") from None
        if not name and len(self.bundles) == 1:
            name = next(iter(self.bundles))
        if name not in self.bundles:
            raise VlmpruneError(f"no served model {name!r}", f"GET /v1/models lists them: {', '.join(self.bundles)}")
        return self.bundles[name], keep if keep is not None else at_keep

    async def execute(self, bundle: ServedBundle, work: Callable, cancel: threading.Event,
                      on_admitted: Callable[[float], None] | None = None):
        """Run ``work(pipe)`` on a free pipeline of ``bundle`` in a worker thread. Refused at once (``Busy``) when
        every slot runs and the queue is full; the wait counts against the caller's timeout."""
        if self.inflight >= self.config.max_concurrency + self.config.max_queue:
            raise Busy()
        self.inflight += 1  # counted out in the finally below: no await between the check and the try
        t0 = time.perf_counter()
        try:
            await self._slots.acquire()
            try:
                pipe = await bundle.pool.get()
                self.running += 1
                try:
                    if on_admitted is not None:
                        on_admitted(time.perf_counter() - t0)
                    loop = asyncio.get_running_loop()
                    # a thread cannot be cancelled: a cancelled await sets ``cancel`` (the decode loop stops at its
                    # next step) and still waits for the pipeline before it goes back to the pool
                    future = loop.run_in_executor(self.executor, work, pipe)
                    try:
                        return await asyncio.shield(future)
                    except asyncio.CancelledError:
                        cancel.set()
                        await asyncio.wait([future])
                        raise
                finally:
                    self.running -= 1
                    bundle.pool.put_nowait(pipe)
            finally:
                self._slots.release()
        finally:
            self.inflight -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=True)
