"""One colour per pruning method (and per TTFT stage), shared by every plot: prune-bench, prune-profile, prune-eval.

Fixed, not assigned in order of appearance, so a method keeps its colour across pictures that show different
subsets of methods. Colours from matplotlib's default cycle (tab10); no matplotlib import here."""

from __future__ import annotations

METHOD_COLORS = {
    "fopru": "#1f77b4",  # blue
    "gprune": "#ff7f0e",  # orange
    "gridprune": "#2ca02c",  # green
    "l2norm": "#9467bd",  # purple
    "pool": "#8c564b",  # brown
    "none": "#7f7f7f",  # grey: the unpruned reference
}
_SPARE = ["#e377c2", "#bcbd22", "#17becf", "#d62728"]  # for methods added later, in name order

# Stages up to the first token (stages.png), in the order they run.
STAGE_COLORS = {
    "preprocess": "#c7c7c7",
    "text encoder": "#98df8a",
    "vision+prune": "#aec7e8",
    "prefill": "#ffbb78",
    "other": "#f7f7f7",
}


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)]  # stable across runs, unlike hash()
