"""The two pictures of ``prune-bench``: TTFT against keep ratio, and the stages up to the first token.

The stage bars add up to what was measured: the stages timed inside the TTFT runs, then "other" = TTFT - their sum
(tokenising the prompt, stitching the kept tokens into it, sampling the first token, Python between stages), and the
measured TTFT drawn as a marker on every bar. Medians of separate quantities need not add up exactly: where the
stage medians sum past the TTFT median, "other" is 0 and the bar pokes above the marker, which the caption says.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from vlmprune.palette import STAGE_COLORS, method_color

# (row key, label); vision+prune as timed inside the same runs as TTFT (older results: the separate paired timing)
STAGES = [("preprocess_ms", "preprocess"), ("text_encoder_ms", "text encoder"), ("vision_in_run_ms", "vision+prune"),
          ("prefill_ms", "prefill")]


# Figures are laid out at the resolution they are saved at: text widths do not scale exactly with the resolution.
DPI = 120


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_segments(row: dict) -> tuple[list[tuple[str, float]], float, float]:
    """The bar of one row: [(stage, ms)] including "other", the measured TTFT, and how far the stages overshoot it
    (0 when they fit)."""
    segs = [(name, float(row.get(key, row["vision_prune_ms"]) if key == "vision_in_run_ms" else row[key])) for key, name in STAGES]
    total = sum(v for _, v in segs)
    ttft = float(row["ttft_ms"])
    segs.append(("other", max(0.0, ttft - total)))
    return segs, ttft, max(0.0, total - ttft)


def plot_ttft(report: dict, rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig = ttft_figure(plt, report, rows)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # nothing cut at the edge
    plt.close(fig)
    return path


def ttft_figure(plt, report: dict, rows: list[dict]):
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=DPI)
    for method in dict.fromkeys(r["method"] for r in rows):
        color = method_color(method)
        pts = sorted((r["keep"], r["ttft_ms"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=f"{method} (runtime)")
        hf = sorted((r["keep"], r["transformers_ttft_ms"]) for r in rows
                    if r["method"] == method and "transformers_ttft_ms" in r)
        if hf:
            ax.plot([p[0] for p in hf], [p[1] for p in hf], marker="x", linestyle="--", alpha=0.6, color=color,
                    label=f"{method} (transformers eager)")
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"TTFT against keep ratio - {report['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_stages(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig = stages_figure(plt, rows)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # nothing cut at the edge
    plt.close(fig)
    return path


def stages_figure(plt, rows: list[dict]):
    """Stacked stage medians per (method, keep), grouped by method, with the measured TTFT as a black tick."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    xs, ticks, groups, x = [], [], [], 0.0
    ordered = []
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["keep"])
        start = x
        for r in mine:
            ordered.append(r)
            xs.append(x)
            ticks.append(f"{r['keep']}\nK={r['k']}")
            x += 1
        groups.append((method, (start + x - 1) / 2))
        x += 0.8  # gap between methods
    fig, ax = plt.subplots(figsize=(max(8.0, 0.62 * len(ordered) + 4.5), 4.8), dpi=DPI)
    bottom = np.zeros(len(ordered))
    bars = [stage_segments(r) for r in ordered]
    for i, (name, _) in enumerate(bars[0][0]):
        vals = np.array([b[0][i][1] for b in bars])
        if name == "text encoder" and not vals.any():
            continue  # no text-guided method in the run
        ax.bar(xs, vals, bottom=bottom, width=0.7, color=STAGE_COLORS[name], edgecolor="#555555", linewidth=0.5,
               label=name if name != "other" else "other (tokenise, stitch, sample, Python)")
        bottom += vals
    ttfts = [b[1] for b in bars]
    ax.scatter(xs, ttfts, marker="_", s=420, linewidths=2.2, color="black", zorder=3, label="measured TTFT (median)")
    overshoot = [(o, r) for (_, _, o), r in zip(bars, ordered) if o > 0]
    ax.set_xticks(xs)
    ax.set_xticklabels(ticks, fontsize=8)
    for method, centre in groups:
        ax.annotate(method, (centre, 0), xycoords=("data", "axes fraction"), xytext=(0, -34),
                    textcoords="offset points", ha="center", va="top", fontsize=9, fontweight="bold",
                    color=method_color(method))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms (medians over the timed runs)")
    ax.set_title("Stages up to the first token (keep ratio and K under each bar)")
    caption = "other = TTFT - sum of the stages"
    if overshoot:
        worst = max(o for o, _ in overshoot)
        caption += f"; on {len(overshoot)} bar(s) the stage medians sum past the TTFT median (by <= {worst:.1f} ms)"
    if not any("vision_in_run_ms" in r for r in ordered):
        caption += "; vision+prune timed in separate runs, not inside the TTFT runs"
    # the caption is the x label, wrapped to the figure's width, so the layout keeps it inside the canvas and
    # below the method names
    chars = int(fig.get_figwidth() * 72 / (0.55 * 7.5)) - 4
    ax.set_xlabel(textwrap.fill(caption, chars), fontsize=7.5, loc="left", labelpad=30)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(pad=0.6)
    return fig


def plots(report: dict, out: Path) -> list[Path]:
    first = (report.get("decoder_precisions") or ["fp32"])[0]  # the other precisions cover one method only
    rows = [r for r in report["rows"] if r.get("decoder_precision", first) == first]
    return [plot_ttft(report, rows, out / "ttft_vs_keep.png"), plot_stages(rows, out / "stages.png")]
