"""The server's Prometheus metrics (prometheus-client, one registry per app): queue wait, TTFT and TPOT histograms;
tokens, requests by outcome and cache hits and misses; the caches' resident bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OUTCOMES = ("ok", "rejected", "bad_request", "cancelled", "timeout", "error")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_wait = Histogram("vlmprune_queue_wait_seconds", "Time a request waited for a free pipeline",
                                    ["model"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("vlmprune_ttft_seconds", "Request start to the first generated token", ["model"],
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("vlmprune_tpot_seconds", "Mean time per output token after the first", ["model"],
                              buckets=_STEP, registry=r)
        self.tokens = Counter("vlmprune_tokens", "Tokens by kind (prompt, completion, visual_kept, cached)",
                              ["model", "kind"], registry=r)
        self.requests = Counter("vlmprune_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.cache = Counter("vlmprune_cache_lookups", "Cache lookups by cache (vision, kv) and result (hit, miss)",
                             ["cache", "result"], registry=r)
        for cache in ("vision", "kv"):
            for result in ("hit", "miss"):
                self.cache.labels(cache, result)
        self.cache_bytes = Gauge("vlmprune_cache_resident_bytes", "Bytes the cache holds", ["cache"], registry=r)
        self.inflight = Gauge("vlmprune_requests_in_flight", "Requests running or waiting", registry=r)

    def cache_event(self, kind: str, hit: bool) -> None:
        self.cache.labels(kind, "hit" if hit else "miss").inc()

    def watch(self, engine) -> None:
        """Gauges read when scraped."""
        for kind in ("vision", "kv"):
            self.cache_bytes.labels(kind).set_function(
                (lambda k: lambda: engine.store.resident(k) if engine.store is not None else 0)(kind))
        self.inflight.set_function(lambda: engine.inflight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
