"""The benchmark and profile pictures, read back from their matplotlib figures: stage bars that add up to the measured
TTFT (never taller without saying so), x labels that do not overlap, profile axes from zero with whiskers, and one
colour per method everywhere."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from preset_geometry import preset_tokens, spec_k  # noqa: E402
from vlmprune.export.bench_plots import plots, stage_segments, stages_figure, ttft_figure  # noqa: E402
from vlmprune.palette import method_color  # noqa: E402
from vlmprune.runtime.profile_cli import profile_figure, write_outputs  # noqa: E402


N, _ = preset_tokens("bench-llava")  # prune-bench's preset


def _k(keep):
    return spec_k(keep, N)


def drawn_texts(fig) -> list:
    """Every text matplotlib draws in ``fig`` (titles, axis labels, the tick labels it shows, annotations, legend
    entries, figure texts), with its box in display pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if not hasattr(fig.canvas, "get_renderer"):  # closed after saving: give it its Agg canvas back
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in (fig.texts + ([fig._suptitle] if fig._suptitle else [])) if isinstance(t, Text)]
    for leg in fig.legends:
        texts += leg.get_texts()
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label] + list(ax.texts)
        for axis in (ax.xaxis, ax.yaxis):
            texts += [t.label1 for t in axis._update_ticks() if t.label1.get_visible()]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    texts = list({id(t): t for t in texts}.values())  # the suptitle is also among fig.texts
    # Text's own box: an annotation's would include its leader line
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def assert_layout_clean(fig) -> None:
    """Every text inside the canvas and no two texts overlapping (one pixel of slack for anti-aliasing)."""
    width, height = fig.bbox.width, fig.bbox.height
    boxes = drawn_texts(fig)
    for text, b in boxes:
        assert b.x0 >= -1 and b.y0 >= -1 and b.x1 <= width + 1 and b.y1 <= height + 1, \
            f"{text!r} leaves the {width:.0f}x{height:.0f} canvas: {b}"
    for ax in fig.axes:
        if ax.get_legend():
            b = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
            assert b.x1 <= width + 1 and b.y0 >= -1, f"legend leaves the canvas: {b}"
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            assert not (a.x0 + 1 < b.x1 and b.x0 + 1 < a.x1 and a.y0 + 1 < b.y1 and b.y0 + 1 < a.y1), \
                f"{ta!r} overlaps {tb!r}"


def _rows():
    rows = []
    for method in ("fopru", "gprune", "gridprune"):
        for keep in (1.0, 0.5, 0.25, 0.111):
            k = _k(keep)
            stages = dict(preprocess_ms=3.0, text_encoder_ms=2.0 if method == "gridprune" else 0.0,
                          vision_in_run_ms=13.0, vision_prune_ms=12.0, prefill_ms=200 * keep + 15)
            # most runs leave a few ms outside the stages; one bar's stage medians sum past its TTFT median
            ttft = sum(stages.values()) - stages["vision_prune_ms"] + (-2.0 if (method, keep) == ("fopru", 0.5) else 4.0)
            rows.append({"method": method, "keep": keep, "k": k, "ttft_ms": ttft, "transformers_ttft_ms": 1.4 * ttft,
                         **stages})
    return rows


def test_stage_segments_add_up_to_the_measured_ttft():
    rows = _rows()
    for r in rows:
        segs, ttft, over = stage_segments(r)
        total = sum(v for _, v in segs)
        assert [n for n, _ in segs] == ["preprocess", "text encoder", "vision+prune", "prefill", "other"]
        assert dict(segs)["vision+prune"] == r["vision_in_run_ms"]  # the stage timed inside the TTFT runs
        if over:
            assert dict(segs)["other"] == 0 and total == pytest.approx(ttft + over)
        else:
            assert total == pytest.approx(ttft) and dict(segs)["other"] == pytest.approx(4.0)
    old = {k: v for k, v in rows[0].items() if k != "vision_in_run_ms"}  # results.json from before the field
    assert dict(stage_segments(old)[0])["vision+prune"] == old["vision_prune_ms"]


def test_stage_bars_end_at_the_ttft_marker_and_labels_do_not_overlap():
    rows = _rows()
    fig = stages_figure(plt, rows)
    ax = fig.axes[0]
    tops: dict[float, float] = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2, 6)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    marker = ax.collections[0].get_offsets()
    assert len(marker) == len(rows) == len(tops)
    for (x, ttft), top in zip(np.asarray(marker), (tops[round(float(x), 6)] for x in np.asarray(marker)[:, 0])):
        over = top - ttft
        assert over == pytest.approx(0, abs=1e-9) or 0 < over <= 2.0 + 1e-9  # only the flagged bar, by its 2 ms
    caption = ax.get_xlabel().replace("\n", " ")
    assert "other = TTFT - sum of the stages" in caption and "1 bar(s)" in caption
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "x labels overlap"
    plt.close(fig)


def test_bench_plots_use_the_palette(tmp_path):
    fig = ttft_figure(plt, {"model": "m"}, _rows())
    lines = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].lines}
    assert fig.axes[0].get_ylim()[0] == 0
    for method in ("fopru", "gprune", "gridprune"):
        assert lines[f"{method} (runtime)"] == lines[f"{method} (transformers eager)"] == method_color(method)
    plt.close(fig)
    written = plots({"model": "m", "rows": _rows()}, tmp_path)
    assert [p.name for p in written] == ["ttft_vs_keep.png", "stages.png"] and all(p.stat().st_size for p in written)


def _profile_rows(with_p10=True):
    rows = []
    for method, keep, med in (("none", 1.0, 13.0), ("fopru", 0.25, 9.0), ("fopru", 0.5, 10.0),
                              ("gridprune", 0.25, 9.5)):
        k = _k(keep)
        r = {"name": f"{method}-k{k}", "method": method, "keep": keep, "k": k, "min": med - 3, "median": med,
             "mean": med, "max": med + 8, "p90": med + 2, "p95": med + 3, "p99": med + 6, "metric": "CPU latency"}
        if with_p10:
            r["p10"] = med - 1
        rows.append(r)
    return rows


@pytest.mark.parametrize("with_p10", [True, False])
def test_profile_axis_from_zero_with_whiskers_and_method_colours(with_p10):
    rows = _profile_rows(with_p10)
    fig = profile_figure(plt, rows, "t")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0
    low = "p10" if with_p10 else "min"
    assert f"whiskers {low} to p90" in ax.get_ylabel()
    by_label = {c.get_label(): c for c in ax.containers}
    for method in ("fopru", "gridprune"):
        line, _, (bars,) = by_label[method]
        assert to_hex(line.get_color()) == method_color(method)
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["keep"])
        segs = bars.get_segments()
        assert [tuple(s[:, 1]) for s in segs] == [(r[low], r["p90"]) for r in mine]
    plt.close(fig)


def test_profile_writes_its_picture(tmp_path):
    written = write_outputs(_profile_rows(), tmp_path, "t")
    assert (tmp_path / "profile.png") in written and (tmp_path / "profile.png").stat().st_size > 0


# --- every plot: text inside the canvas, no overlapping labels ----------------------------------------------------------


def _next_rows():
    """prune-bench --model bench-llava-next: several layouts per method, vision+prune timed in separate runs."""
    rows = []
    for method in ("fopru", "gprune"):
        for keep in (1.0, 0.5, 0.25):
            stages = dict(preprocess_ms=5.0, text_encoder_ms=0.0, vision_prune_ms=40.0, prefill_ms=300 * keep + 20)
            rows.append({"method": method, "keep": keep, "k": _k(keep), "ttft_ms": sum(stages.values()) + 3, **stages})
    return rows


@pytest.mark.parametrize("rows", [_rows(), _next_rows()], ids=["llava", "llava-next"])
def test_bench_figures_keep_their_text_inside_and_apart(rows):
    for fig in (stages_figure(plt, rows), ttft_figure(plt, {"model": "bench-llava-next"}, rows)):
        assert_layout_clean(fig)
        plt.close(fig)
    fig = stages_figure(plt, _next_rows())
    assert "vision+prune timed in separate runs" in fig.axes[0].get_xlabel().replace("\n", " ")
    plt.close(fig)


def _layout_rows():
    """A LLaVA-NeXT bundle: five layouts, each with buckets at the same keep ratios (names <method>-<layout>-k<K>)."""
    rows = []
    for layout in ("1x1", "1x2", "2x1", "2x2", "1x3"):
        for method, keep in (("none", 1.0), ("fopru", 0.25), ("fopru", 0.5)):
            k = _k(keep)
            med = 10.0 + keep * 5 + len(layout)
            rows.append({"name": f"{method}-{layout}-k{k}", "method": method, "keep": keep, "k": k, "min": med - 2,
                         "p10": med - 1, "median": med, "mean": med, "max": med + 4, "p90": med + 1})
    return rows


def test_profile_draws_one_labelled_line_per_layout_never_joining_layouts():
    rows = _layout_rows()
    fig = profile_figure(plt, rows, "profile of a bundle with five layouts")
    ax = fig.axes[0]
    labels = [c.get_label() for c in ax.containers]
    assert labels == [f"{m}-{lay}" + (" (unpruned)" if m == "none" else "")
                      for lay in ("1x1", "1x2", "2x1", "2x2", "1x3") for m in ("none", "fopru")]
    for container in ax.containers:  # each line holds one layout's buckets only: one point per keep ratio
        xs = list(container[0].get_xdata())
        assert len(xs) == len(set(xs))
    assert_layout_clean(fig)
    plt.close(fig)
    fig = profile_figure(plt, _profile_rows(), "t")
    assert [c.get_label() for c in fig.axes[0].containers] == ["none (unpruned)", "fopru", "gridprune"]
    assert_layout_clean(fig)
    plt.close(fig)


def test_eval_pareto_labels_do_not_overlap(tmp_path):
    """Clustered points (the trial's "0.1110.25"): every keep label placed apart and inside the canvas."""
    from vlmprune.runtime import eval_report

    rows = []
    for n, method in enumerate(("fopru", "gprune", "gridprune", "l2norm")):
        for keep, ttft in zip((1.0, 0.5, 0.25, 0.111), (100.0, 60.0, 59.0, 58.5)):
            rows.append({"bundle": method, "line": method, "method": method, "keep": keep, "items": 8,
                         "ttft_ms": ttft + 0.3 * n, "vqa_accuracy": 0.5, "identical_answer": 0.75 - 0.01 * n,
                         "token_f1": 0.8})
    report = {"rows": rows, "dataset": {"labelled": 8, "items": 8}, "settings": {"max_new_tokens": 8}}
    captured = {}
    real_savefig = plt.Figure.savefig

    def keep_figure(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep_figure
    try:
        assert eval_report.plot(report, tmp_path / "pareto.png") == tmp_path / "pareto.png"
    finally:
        plt.Figure.savefig = real_savefig
    assert_layout_clean(captured["fig"])
    labels = [t for t, _ in drawn_texts(captured["fig"]) if t in ("1", "0.5", "0.25", "0.111")]
    assert len(labels) == 3 * 16  # every point labelled, in each of the three panels
