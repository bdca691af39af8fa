"""Static budget buckets: one static K per keep ratio (or token count), plus the unpruned ``none`` reference."""

from __future__ import annotations

from dataclasses import dataclass

from vlmprune.cli_common import parse_list  # noqa: F401  (re-exported: bench uses it from here)
from vlmprune.errors import VlmpruneError
from vlmprune.prune import METHODS, MethodSpec


@dataclass(frozen=True)
class Bucket:
    method: str
    keep: float  # the ratio asked for (K / N when given as tokens, or when the method fixes K, as pool does)
    k: int  # what the graph returns: the manifest's truth
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method}-k{self.k}"

    @property
    def file(self) -> str:
        return f"vision_{self.method}_k{self.k}.onnx"


def plan_buckets(spec: MethodSpec, options: dict, n: int, grid: tuple[int, int], keeps=(), tokens=()) -> list[Bucket]:
    """The buckets to export, the ``none`` reference first; duplicates (same K) are dropped."""
    if not keeps and not tokens:
        raise VlmpruneError("no budget given", "use --keep 0.25[,0.5,...] or --tokens 144[,...]")
    spec.check_grid(options, grid)
    buckets = [Bucket("none", 1.0, n)]
    seen = {("none", n)}
    opts = tuple(sorted(options.items()))
    requests = [("keep", r) for r in keeps] + [("tokens", t) for t in tokens]
    for kind, value in requests:
        if kind == "keep":
            k = spec.resolve_k(n, grid, keep=float(value), options=options)
            keep = round(k / n, 6) if spec.fixed_k else float(value)  # pool holds N/4 whatever was asked
        else:
            k = spec.resolve_k(n, grid, tokens=int(value), options=options)
            keep = round(k / n, 6)
        if (spec.name, k) in seen:
            continue
        seen.add((spec.name, k))
        buckets.append(Bucket(spec.name, keep, k, opts))
    return buckets


def method_spec(name: str) -> MethodSpec:
    from vlmprune.prune import get_method

    return get_method(name)


__all__ = ["Bucket", "METHODS", "method_spec", "parse_list", "plan_buckets"]
