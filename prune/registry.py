"""The method registry: name -> how to build it, its options with defaults, and its budget rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from vlmprune.errors import VlmpruneError

from .base import PruneModule
from .fopru import SCORES, STRATEGIES, FoPru, rows_for
from .gprune import GPrune
from .gridprune import GridPrune
from .l2norm import L2Norm
from .none import KeepAll
from .pool import Pool


@dataclass(frozen=True)
class Option:
    """A method option: type, default, and the range it is checked against before anything loads."""

    name: str
    default: Any
    kind: type
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...] rather than [low, ...]

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return "any"
        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'integer ' if self.kind is int else ''}in {left}{low}, {high}]"

    def check(self, value, method: str, shown=None):
        shown = value if shown is None else shown
        bad = False
        if self.choices:
            bad = value not in self.choices
        elif self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad = True
            else:
                bad = ((self.low is not None and (value <= self.low if self.low_open else value < self.low))
                       or (self.high is not None and value > self.high))
        if bad:
            raise VlmpruneError(f"option {self.name}={shown!r} of method {method!r} is not {self.range_text()}",
                                f"give e.g. {self.name}={self.default} (see prune-export --list-options)")
        return value

    def parse(self, text: str, method: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise VlmpruneError(
                f"option {self.name}={text!r} of method {method!r} is not a {self.kind.__name__}",
                f"give e.g. {self.name}={self.default}",
            ) from None
        return self.check(value, method, text)


def budget_from_ratio(keep: float, n: int) -> int:
    """``K = max(1, round(keep * N))`` with halves rounded up (``specs/methods.md``)."""
    validate_keep(keep)
    return max(1, int(keep * n + 0.5))


def validate_keep(keep: float) -> None:
    if not (0.0 < keep <= 1.0):
        raise VlmpruneError(f"keep ratio {keep} is outside (0, 1]", "give a fraction such as --keep 0.25")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: type[PruneModule]
    description: str
    options: tuple[Option, ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)  # "attention", "text", "projected", "cls"
    budget_rule: Callable[[int, tuple[int, int], float | None, int | None, dict], int] | None = None
    fixed_k: bool = False  # K does not follow the keep ratio (pool): buckets are labelled with K / N
    grid_check: Callable[[dict, tuple[int, int]], str | None] | None = None  # option limits that depend on the grid

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def check_grid(self, options: dict, grid: tuple[int, int]) -> None:
        """Option limits that need the model's patch grid (known once its config is read)."""
        problem = self.grid_check(options, tuple(grid)) if self.grid_check else None
        if problem:
            raise VlmpruneError(f"method {self.name!r}: {problem}", "see prune-export --list-options")

    def describe_options(self) -> list[str]:
        if not self.options:
            return ["  (no options)"]
        return [f"  {o.name}={o.default}  ({o.range_text()}): {o.help}" for o in self.options]

    def parse_options(self, pairs: dict[str, str] | None) -> dict[str, Any]:
        """Typed options from ``key=value`` strings; unknown keys are an error."""
        values = self.defaults()
        by_name = {o.name: o for o in self.options}
        for key, text in (pairs or {}).items():
            if key not in by_name:
                known = ", ".join(by_name) or "none"
                raise VlmpruneError(f"method {self.name!r} has no option {key!r}", f"its options are: {known}")
            values[key] = by_name[key].parse(str(text), self.name)
        return values

    def resolve_k(self, n: int, grid: tuple[int, int], *, keep: float | None = None, tokens: int | None = None,
                  options: dict | None = None) -> int:
        """The K this method returns for a keep ratio or a token count (exactly one of them)."""
        if (keep is None) == (tokens is None):
            raise VlmpruneError("give exactly one of a keep ratio or a token count", "use --keep R or --tokens K")
        if keep is not None:
            validate_keep(keep)
        if tokens is not None and not 1 <= tokens <= n:
            raise VlmpruneError(f"K={tokens} tokens is outside 1..N={n} for this model", f"give --tokens between 1 and {n}")
        opts = {**self.defaults(), **(options or {})}
        if self.budget_rule is not None:
            return self.budget_rule(n, grid, keep, tokens, opts)
        return tokens if tokens is not None else budget_from_ratio(keep, n)

    def build(self, k: int, grid: tuple[int, int], has_cls: bool = True, **options) -> PruneModule:
        return self.module(k, grid, has_cls, **{**self.defaults(), **options})


def _fopru_budget(n, grid, keep, tokens, opts):
    if opts.get("strategy") == "row":
        h, w = grid
        rows = max(1, int(keep * h + 0.5)) if keep is not None else rows_for(tokens, grid)
        return min(rows, h) * w
    return tokens if tokens is not None else budget_from_ratio(keep, n)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        MethodSpec("none", KeepAll, "keep all tokens (unpruned reference)", budget_rule=lambda n, g, r, t, o: n),
        MethodSpec(
            "fopru", FoPru, "FoPru: attention significance of the penultimate encoder layer, before the projector",
            (
                Option("strategy", "rank", str, "rank: top-K tokens; row: best whole grid rows", STRATEGIES),
                Option("scores", "probs", str, "attention probabilities or pre-softmax logits", SCORES),
            ),
            frozenset({"attention"}),
            _fopru_budget,
        ),
        MethodSpec(
            "gprune", GPrune, "G-Prune: information propagation on the cosine graph of post-projector features",
            (
                Option("threshold", 0.5, float, "cosine similarity below which edges are removed", low=-1.0, high=1.0),
                # cos / temperature must stay finite in fp32 and fp16 graphs: no temperature below 1e-4
                Option("temperature", 0.03, float, "softmax temperature of the row normalisation", low=1e-4, high=100.0),
                Option("iterations", 5, int, "propagation steps", low=0, high=100),
            ),
            frozenset({"projected"}),
        ),
        MethodSpec(
            "gridprune", GridPrune, "GridPrune: text-guided zone budgets, fused relevance + CLS saliency within zones",
            (
                Option("zones", 4, int, "zones per side (g x g zones), at most the patch grid's side", low=1, high=1024),
                Option("alpha", 0.5, float, "weight of the CLS saliency in the fused score", low=0.0, high=1.0),
                Option("tau", 1.0, float, "temperature of the zone softmax", low=1e-4, high=100.0),
            ),
            frozenset({"attention", "text", "cls"}),  # saliency is CLS attention
            grid_check=lambda o, g: (f"zones={o['zones']} exceeds the {g[0]}x{g[1]} patch grid (at most {min(g)})"
                                     if o["zones"] > min(g) else None),
        ),
        MethodSpec("l2norm", L2Norm, "top-K of the post-projector L2 norm (ablation)", needs=frozenset({"projected"})),
        MethodSpec("pool", Pool, "2x2 average pooling of the patch grid, K = N/4 (ablation)",
                   budget_rule=lambda n, g, r, t, o: n // 4, fixed_k=True,
                   grid_check=lambda o, g: None if g[0] % 2 == 0 and g[1] % 2 == 0 else
                   f"2x2 pooling needs an even patch grid, not {g[0]}x{g[1]}"),
    ]
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise VlmpruneError(f"unknown pruning method {name!r}", f"choose one of: {', '.join(METHODS)}") from None
