"""prune-bench on a LLaVA-NeXT preset (the one bench runner, with the family's bench hooks): the buckets of the image's
own layout, one row per bucket with stage times measured by the anyres pipeline, and the LLaVA-NeXT target
TTFT(1.0)/TTFT(0.25) computed from those rows."""

from __future__ import annotations

import types

import pytest

from vlmprune.models.presets import PRESETS
from vlmprune.sample import make_sample_image

PRESET = "tiny-llava-next"


def test_anyres_bench_rows_and_the_speedup_target(tmp_path, monkeypatch):
    from vlmprune.export.bench import VISION_RUNS, VISION_WARMUP, run_bench
    from vlmprune.runtime import profile

    timed_calls = []
    real_timed = profile.timed
    monkeypatch.setattr(profile, "timed", lambda fn, *a, **k: timed_calls.append(fn) or real_timed(fn, *a, **k))
    from vlmprune.models.llava_next.geometry import layout_for_image

    spec = PRESETS[PRESET]
    image = make_sample_image()
    w, h = image.size
    side = spec.image_size // spec.patch_size
    layout = layout_for_image((h, w), [list(p) for p in spec.grid_pinpoints], spec.image_size, side)
    args = types.SimpleNamespace(model=PRESET, methods="gprune", keep="1.0,0.25", repeats=1, warmup=0,
                                 image="sample", out=tmp_path, threads=None, prompt="What is in the picture?",
                                 new_tokens=3, decoder_precisions="fp32")
    report = run_bench(args)
    rows = report["rows"]
    assert [r["view"] for r in rows] == [f"layout {layout.name}"] * 2
    assert [(r["method"], r["keep"]) for r in rows] == [("gprune", 1.0), ("gprune", 0.25)]
    full, quarter = rows
    assert quarter["k"] < full["k"] and quarter["prompt_tokens"] - quarter["k"] == full["prompt_tokens"] - full["k"]
    for row in rows:
        assert row["ttft_ms"] > row["prefill_ms"] > 0 and row["vision_prune_ms"] > 0 and row["tokens_generated"] == 3
    target = next(t for t in report["targets"] if t["target"].startswith("TTFT(1.0)/TTFT(0.25) gprune"))
    assert target["measured"] == pytest.approx(full["ttft_ms"] / quarter["ttft_ms"], abs=1e-3)
    assert target["met"] == (target["measured"] >= 3)
    assert all(v.startswith("skipped") for v in report["peers"].values())
    assert (tmp_path / "bundles" / "gprune-fp32" / "manifest.json").is_file()
    # one bench protocol for every family: the vision graphs timed as many times as the single-view bench times them
    assert len(timed_calls) == 2 * 2 * VISION_RUNS and VISION_WARMUP == 3  # 2 buckets x (unpruned, bucket) pairs
