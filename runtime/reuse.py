"""Reuse across requests: the vision graph's outputs and the decoder's KV cache over a shared stitched prefix.

Both live in one ``ByteLRU`` bounded in bytes (``prune-serve --cache-mb``). Nothing here knows a family:

- **Vision outputs** are keyed by a digest of every feed the bucket's graph gets (the preprocessed pixels and, for
  text-guided methods such as GridPrune, the text embeddings of the prompt) and the graph's file (bucket and
  method). A prompt-blind method hits on the same image whatever is asked; a text-guided one only on the same
  image *and* prompt, so its answers never use another prompt's selection.
- **KV prefixes** are keyed by the stitched sequence itself: one chained digest per stitched token over its
  embedding row and its position ids, so a cached entry matches a new sequence exactly as far as both agree
  (the longest common prefix, as llama.cpp's prompt cache does). Causal attention makes the KV of those tokens
  depend on nothing after them. For a prompt-blind method the match covers the template's prefix and the kept
  image tokens; for GridPrune the kept tokens differ with the prompt, so it stops at the template's prefix.

Torch-free. The decoders provide ``snapshot(n) -> [arrays] | None`` (the first n tokens' KV) and ``restore(arrays, n)`` (host memory only;
a decoder without them, or with its cache on a GPU, is simply not cached).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np


class ByteLRU:
    """A thread-safe LRU whose bound is the bytes its values hold; keys are tuples whose first item is the kind."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int) -> bool:
        """Keep ``value`` unless it alone exceeds the bound; evict the least recently used until it fits."""
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes[key[0]] -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes[key[0]] = self._bytes.get(key[0], 0) + nbytes
            while sum(self._bytes.values()) > self.max_bytes:
                k, (_, n) = self._items.popitem(last=False)
                self._bytes[k[0]] -= n
        return True

    def values(self, kind: str, scope) -> list:
        """The values of one kind and scope, most recently used first (for the prefix search)."""
        with self._lock:
            return [v for k, (v, _) in reversed(self._items.items()) if k[0] == kind and k[1] == scope]

    def touch(self, key) -> None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)

    def resident(self, kind: str) -> int:
        with self._lock:
            return self._bytes.get(kind, 0)


def digest_feeds(feeds: dict[str, np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        a = np.ascontiguousarray(feeds[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.digest()


def prefix_keys(embeds: np.ndarray, positions: np.ndarray) -> list[bytes]:
    """One digest per stitched token, chained: key i identifies tokens 0..i (rows and positions) together."""
    length = embeds.shape[1]
    rows = np.ascontiguousarray(embeds[0])
    pos = np.ascontiguousarray(np.asarray(positions).reshape(-1, length).T)  # [L, rank]: 1-D or M-RoPE ids
    keys, prev = [], b""
    for i in range(length):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(rows[i].tobytes())
        h.update(pos[i].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def common_prefix(a: list[bytes], b: list[bytes]) -> int:
    """Length of the common prefix of two chained key lists (equal at i means equal up to i: binary search)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Entry:
    __slots__ = ("keys", "arrays", "length")

    def __init__(self, keys, arrays, length):
        self.keys, self.arrays, self.length = keys, arrays, length


class CachedVision:
    """A vision backend whose outputs are kept in the LRU, keyed by the digest of its feeds and its graph."""

    def __init__(self, backend, reuse: "Reuse", graph: str):
        self.backend, self.reuse, self.graph = backend, reuse, graph

    def __getattr__(self, name):  # inputs, outputs, providers, shapes, ... of the wrapped backend
        return getattr(self.backend, name)

    def run(self, feeds, outputs=None):
        key = ("vision", self.reuse.scope, self.graph, tuple(outputs or ()), digest_feeds(feeds))
        hit = self.reuse.store.get(key)
        self.reuse.event("vision", hit is not None)
        if hit is not None:
            return dict(hit)
        out = self.backend.run(feeds, outputs)
        frozen = {}
        for k, v in out.items():  # shared between requests: nobody may write into them
            v = np.array(v, copy=True)
            v.flags.writeable = False
            frozen[k] = v
        self.reuse.store.put(key, frozen, sum(v.nbytes for v in frozen.values()))
        return dict(frozen)


class Reuse:
    """One pipeline's hooks: the shared store (``None``: no caching), its scope (the bundle and decoder kind, so
    pipelines of one bundle share entries), and the running request's cancel check.

    ``decode_loop.decode`` calls ``before_prefill``/``after_prefill`` and ``cancelled``; the pipeline wraps its
    vision backends with ``vision``."""

    def __init__(self, store: ByteLRU | None, scope: str, *, on_event: Callable[[str, bool], None] | None = None):
        self.store, self.scope, self.on_event = store, scope, on_event
        self.cancel: Callable[[], bool] | None = None
        self.reused = 0  # stitched tokens the last prefill took from the cache
        self._keys: list[bytes] | None = None

    def event(self, kind: str, hit: bool) -> None:
        if self.on_event is not None:
            self.on_event(kind, hit)

    def vision(self, backend, graph: str):
        return backend if self.store is None else CachedVision(backend, self, graph)

    def cancelled(self) -> bool:
        return self.cancel is not None and bool(self.cancel())

    def before_prefill(self, decoder, embeds: np.ndarray, positions: np.ndarray) -> int:
        """Restore the longest cached KV prefix of this stitched sequence into ``decoder`` (already reset); returns
        how many of its tokens need no prefill. At least one token is always left to compute the first logits."""
        self.reused, self._keys = 0, None
        if self.store is None or not callable(getattr(decoder, "snapshot", None)):
            return 0
        keys = self._keys = prefix_keys(embeds, positions)
        best, entry = 0, None
        for candidate in self.store.values("kv", self.scope):
            n = common_prefix(candidate.keys, keys)
            if n > best:
                best, entry = n, candidate
        best = min(best, len(keys) - 1)
        if entry is None or best < 1:
            self.event("kv", False)
            return 0
        decoder.restore(entry.arrays, best)
        self.store.touch(("kv", self.scope, entry.keys[-1]))
        self.event("kv", True)
        self.reused = best
        return best

    def after_prefill(self, decoder, length: int) -> None:
        """Keep the KV of the whole stitched prompt (its prefix serves later requests that share it)."""
        keys, self._keys = self._keys, None
        if keys is None:
            return
        key = ("kv", self.scope, keys[-1])
        if self.store.get(key) is not None:
            return
        arrays = decoder.snapshot(length)
        if arrays is None:  # the cache lives on a device
            return
        nbytes = sum(a.nbytes for a in arrays) + 16 * len(keys)
        self.store.put(key, _Entry(keys, arrays, len(keys)), nbytes)
