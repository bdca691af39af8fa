"""``prune-eval``'s summary from the stored answers: metrics per bundle and bucket, the markdown table and the
Pareto plot (quality against median time to first token, one line per method and bundle)."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from vlmprune.atomic import atomic_write_bytes, atomic_write_text

from .eval_data import Dataset
from .eval_metrics import agreement, reference_scores
from .eval_run import BundlePlan, key

AGREEMENT = ("identical_answer", "first_token", "token_f1", "common_prefix")
REFERENCE = ("exact_match", "vqa_accuracy")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(plans: list[BundlePlan], dataset: Dataset, records: dict, vqa_convention: str = "lmms-eval") -> list[dict]:
    """One row per bundle and bucket, over the items every selected bucket of that bundle answered (so the
    buckets of a bundle are compared on the same items). VQA accuracy follows ``vqa_convention``."""
    rows = []
    for plan in plans:
        items = [i for i in dataset.items
                 if all(key(plan.bundle_id, b["name"], i) in records for b in plan.buckets)]
        refs = {i.qid: records[key(plan.bundle_id, plan.reference["name"], i)] for i in items}
        for bucket in plan.buckets:
            recs = [(i, records[key(plan.bundle_id, bucket["name"], i)]) for i in items]
            agree = [agreement(r, refs[i.qid]) for i, r in recs]
            scored = [reference_scores(r["text"], list(i.answers), vqa_convention) for i, r in recs if i.answers]
            row = {
                "bundle": plan.label, "bundle_path": str(plan.folder), "bundle_id": plan.bundle_id,
                "line": plan.method, "method": bucket["method"], "bucket": bucket["name"], "keep": bucket["keep"],
                "k": bucket["k"], "items": len(recs), "labelled": len(scored),
            }
            for m in REFERENCE:
                row[m] = _mean([s[m] for s in scored])
            for m in AGREEMENT:
                row[m] = _mean([a[m] for a in agree])
            row["ttft_ms"] = statistics.median([r["ttft_ms"] for _, r in recs]) if recs else None
            row["tokens_generated"] = _mean([r["tokens_generated"] for _, r in recs])
            rows.append(row)
    return rows


COLUMNS = [("bundle", "bundle", "{}"), ("method", "method", "{}"), ("keep", "keep", "{}"), ("k", "K", "{}"),
           ("items", "items", "{}"), ("exact_match", "exact match", "{:.3f}"), ("vqa_accuracy", "VQA acc", "{:.3f}"),
           ("identical_answer", "identical answer", "{:.3f}"), ("first_token", "first token", "{:.3f}"),
           ("token_f1", "token F1", "{:.3f}"), ("common_prefix", "common prefix", "{:.3f}"),
           ("ttft_ms", "median TTFT ms", "{:.1f}"), ("tokens_generated", "tokens", "{:.1f}")]


def markdown(report: dict) -> str:
    rows = report["rows"]
    cols = [c for c in COLUMNS if c[0] not in REFERENCE or report["dataset"]["labelled"]]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c[0]] is None else c[2].format(r[c[0]]) for c in cols) + " |")
    d = report["dataset"]
    lines += ["", f"{d['items']} items ({d['kind']}, {d['source']}), {d['skipped']} skipped; greedy, "
                  f"max {report['settings']['max_new_tokens']} new tokens. Agreement is with the unpruned bucket of "
                  "the same bundle; token F1 is over the generated token ids; common prefix is the shared leading "
                  "tokens over the longer answer."]
    return "\n".join(lines) + "\n"


# One colour per method, the same in every plot. Kept here, small, until a shared palette module exists.
_METHOD_ORDER = ["fopru", "gprune", "gridprune", "l2norm", "pool", "none"]
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def method_color(method: str, seen: list[str]) -> str:
    if method in _METHOD_ORDER:
        return _TAB10[_METHOD_ORDER.index(method)]
    if method not in seen:
        seen.append(method)
    return _TAB10[(len(_METHOD_ORDER) + seen.index(method)) % len(_TAB10)]


def _palette():
    extra: list[str] = []
    try:  # a shared palette, where the project has one, keeps methods the same colour across all pictures
        from . import palette  # type: ignore[attr-defined]
    except ImportError:
        return lambda m: method_color(m, extra)
    shared = getattr(palette, "method_color", None)
    table = getattr(palette, "METHOD_COLORS", None)
    if callable(shared):
        return shared
    if isinstance(table, dict):
        return lambda m: table.get(m) or method_color(m, extra)
    return lambda m: method_color(m, extra)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower time, higher quality), by increasing time."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


_OFFSETS = [(0, 6, "center"), (6, -3, "left"), (-6, -3, "right"), (0, -13, "center"), (6, 6, "left"),
            (-6, 6, "right"), (0, 15, "center"), (6, -12, "left"), (-6, -12, "right")]


def place_labels(ax, labels: list[tuple[float, float, str]], dpi: float, size: float = 7.0) -> None:
    """Label each point (keep ratio) at the first nearby spot that overlaps no other label, no marker and stays
    inside the axes: a greedy placement in points (matplotlib has no label placer of its own). The spots ring the
    point at growing distances; a label set further than the first ring gets a thin leader line to its point."""
    from matplotlib.textpath import TextPath

    to_pt = 72.0 / dpi
    anchors = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for x, y, _ in labels]
    x0, y0, x1, y1 = (v * to_pt for v in ax.get_window_extent().extents)
    markers = [(px - 4, py - 4, px + 4, py + 4) for px, py in anchors]
    placed: list[tuple[float, float, float, float]] = []

    def free(box):
        inside = box[0] >= x0 and box[2] <= x1 and box[1] >= y0 and box[3] <= y1
        return inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                                  for b in placed + markers)

    for (x, y, text), (px, py) in zip(labels, anchors):
        w, h = TextPath((0, 0), text, size=size).get_extents().width + 2, size + 2  # the text's own width
        spot = None
        for ring in range(1, 9):
            for dx, dy, ha in _OFFSETS:
                dx, dy = dx * ring, (dy + (3 if dy < 0 else 0)) * ring - (3 if dy < 0 else 0)
                left = px + dx - (w / 2 if ha == "center" else w if ha == "right" else 0)
                box = (left, py + dy, left + w, py + dy + h)
                if free(box):
                    spot = (dx, dy, ha, ring, box)
                    break
            if spot:
                break
        if spot is None:  # nowhere free within eight rings: the first spot, said by the test that checks overlaps
            dx, dy, ha = _OFFSETS[0]
            left = px + dx - w / 2
            spot = (dx, dy, ha, 1, (left, py + dy, left + w, py + dy + h))
        dx, dy, ha, ring, box = spot
        placed.append(box)
        leader = {"arrowprops": {"arrowstyle": "-", "linewidth": 0.4, "color": "#888888", "shrinkA": 0,
                                 "shrinkB": 3}} if ring > 1 else {}
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va="bottom", fontsize=size,
                    **leader)


def plot(report: dict, path: Path) -> Path | None:
    """Quality against median TTFT, one panel per metric; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["items"]]
    if not rows:
        return None
    metrics = ([("vqa_accuracy", "VQA accuracy")] if report["dataset"]["labelled"] else []) + [
        ("identical_answer", "identical greedy answer (vs unpruned)"), ("token_f1", "token F1 (vs unpruned)")]
    color = _palette()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False, dpi=110)
    lines = list(dict.fromkeys((r["line"], r["bundle"]) for r in rows))
    styles = ["-", "--", ":", "-."]
    labels_of: dict[int, list] = {}
    for ax, (metric, title) in zip(axes[0], metrics):
        for n, (method, bundle) in enumerate(lines):
            pts = sorted((r["ttft_ms"], r[metric], r["keep"]) for r in rows
                         if (r["line"], r["bundle"]) == (method, bundle))
            same_method = [b for m, b in lines if m == method]
            label = f"{method} ({bundle})" if len(lines) > 1 else method
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color(method), clip_on=False,
                    linestyle=styles[same_method.index(bundle) % len(styles)], label=label)
            labels_of[id(ax)] = labels_of.get(id(ax), []) + [(x, y, f"{keep:g}") for x, y, keep in pts]
        front = pareto_front([(r["ttft_ms"], r[metric]) for r in rows])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.2,
                linewidth=5, zorder=0, label="Pareto front (all points)")
        ax.set_ylim(0, 1.05)  # from 0: a quality axis that starts higher exaggerates small losses
        ax.set_xlim(0, 1.12 * max(r["ttft_ms"] for r in rows))
        ax.set_xlabel("median time to first token (ms)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of items (point labels: keep ratio)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    d = report["dataset"]
    fig.suptitle(f"Answer quality against TTFT - {d['items']} items, greedy, max "
                 f"{report['settings']['max_new_tokens']} new tokens", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    for ax in axes[0]:  # after the layout: placement works in the final display coordinates
        place_labels(ax, labels_of.get(id(ax), []), fig.dpi)
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())  # a unique temporary name: two runs summarising one --out never collide
    return path


def write_text(path: Path, text: str) -> None:
    """Atomic, under a unique temporary name: a reader sees the old file or the new one, never half of one."""
    atomic_write_text(path, text)
