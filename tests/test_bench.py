"""prune-bench end to end on the tiny preset (one method, two keep ratios, few tokens): files, rows, targets."""

from __future__ import annotations

import json

from PIL import Image

from vlmprune.export.bench import evaluate_targets, main as bench_main


def test_bench_writes_json_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench_main.run(["--model", "tiny-llava", "--methods", "fopru", "--keep", "1.0,0.25", "--repeats", "1",
                           "--warmup", "0", "--new-tokens", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    assert [(r["method"], r["keep"], r["k"]) for r in rows] == [("fopru", 1.0, 576), ("fopru", 0.25, 144)]
    for r in rows:
        assert r["ttft_ms"] >= r["prefill_ms"] > 0 and r["vision_prune_ms"] > 0 and r["peak_rss_mb"] > 10
        assert r["tokens_generated"] == 4 and r["transformers_ttft_ms"] > 0 and r["transformers_tpot_ms"] > 0
        assert r["prune_overhead"] == r["vision_prune_ms"] / r["vision_only_ms"]
    names = {t["target"] for t in report["targets"]}
    assert "TTFT(1.0)/TTFT(0.25) fopru" in names
    assert "| fopru | 0.25 | 144 |" in (out / "results.md").read_text()
    for png in ("ttft_vs_keep.png", "stages.png"):
        assert Image.open(out / png).size[0] > 300


def test_targets_are_computed_from_the_rows():
    rows = [
        {"method": "fopru", "keep": 1.0, "ttft_ms": 300.0, "prune_overhead": 1.0, "tpot_over_bare_step": 1.05},
        {"method": "fopru", "keep": 0.25, "ttft_ms": 100.0, "prune_overhead": 1.04, "tpot_over_bare_step": 1.2},
    ]
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    assert targets["TTFT(1.0)/TTFT(0.25) fopru"]["measured"] == 3.0 and targets["TTFT(1.0)/TTFT(0.25) fopru"]["met"]
    assert not targets["vision+prune / vision-only fopru (worst bucket)"]["met"]
    assert targets["runtime TPOT / bare decoder step (worst)"]["measured"] == 1.2
