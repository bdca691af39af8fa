"""The method registry: name -> how to build it, its options with defaults, and its budget rule."""

from __future__ import annotations

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
    name: str
    default: Any
    kind: type
    help: str
    choices: tuple | None = None

    def parse(self, text: str, method: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise VlmpruneError(
                f"option {self.name}={text!r} of method {method!r} is not a {self.kind.__name__}",
                f"give e.g. {self.name}={self.default}",
            ) from None
        if self.choices and value not in self.choices:
            raise VlmpruneError(
                f"option {self.name}={text!r} of method {method!r} is not one of {', '.join(map(str, self.choices))}",
                "pick one of those",
            )
        return value


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
    needs: frozenset[str] = field(default_factory=frozenset)  # "attention", "text", "projected"
    budget_rule: Callable[[int, tuple[int, int], float | None, int | None, dict], int] | None = None

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

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
                Option("threshold", 0.5, float, "cosine similarity below which edges are removed"),
                Option("temperature", 0.03, float, "softmax temperature of the row normalisation"),
                Option("iterations", 5, int, "propagation steps"),
            ),
            frozenset({"projected"}),
        ),
        MethodSpec(
            "gridprune", GridPrune, "GridPrune: text-guided zone budgets, fused relevance + CLS saliency within zones",
            (
                Option("zones", 4, int, "zones per side (g x g zones)"),
                Option("alpha", 0.5, float, "weight of the CLS saliency in the fused score"),
                Option("tau", 1.0, float, "temperature of the zone softmax"),
            ),
            frozenset({"attention", "text"}),
        ),
        MethodSpec("l2norm", L2Norm, "top-K of the post-projector L2 norm (ablation)", needs=frozenset({"projected"})),
        MethodSpec("pool", Pool, "2x2 average pooling of the patch grid, K = N/4 (ablation)",
                   budget_rule=lambda n, g, r, t, o: n // 4),
    ]
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise VlmpruneError(f"unknown pruning method {name!r}", f"choose one of: {', '.join(METHODS)}") from None
