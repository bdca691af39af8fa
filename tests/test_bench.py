"""prune-bench end to end on the tiny preset (one method, two keep ratios, two decoder precisions, few tokens): files,
rows, peers, targets; and the targets computed from given rows."""

from __future__ import annotations

import importlib.util
import json

from PIL import Image

from preset_geometry import preset_tokens, spec_k
from vlmprune.export.bench import evaluate_targets, main as bench_main

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


def test_bench_writes_json_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench_main.run(["--model", "tiny-llava", "--methods", "fopru", "--keep", "1.0,0.25", "--repeats", "1",
                           "--warmup", "0", "--new-tokens", "4", "--decoder-precisions", "fp32,int4",
                           "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    n, _ = preset_tokens("tiny-llava")
    k = spec_k(0.25, n)
    assert [(r["method"], r["keep"], r["k"], r["decoder_precision"]) for r in rows] == [
        ("fopru", 1.0, n, "fp32"), ("fopru", 0.25, k, "fp32"), ("fopru", 1.0, n, "int4"), ("fopru", 0.25, k, "int4")]
    for r in rows:
        assert r["ttft_ms"] >= r["prefill_ms"] > 0 and r["vision_prune_ms"] > 0 and r["peak_rss_mb"] > 10
        assert r["tokens_generated"] == 4 and r["tpot_ms"] > 0 and r["bare_decoder_step_ms"] > 0
        assert r["prune_overhead"] == r["vision_prune_ms"] / r["vision_only_ms"]
        assert r["decoder"] == ("fused" if HAS_GENAI else "plain")
        # per-token figures are differences of timestamps within one run: never negative, even from one sample
        if r["decoder_precision"] == "fp32":
            assert r["transformers_ttft_ms"] >= r["transformers_prefill_ms"] > 0 and r["transformers_tpot_ms"] > 0
            assert r["ttft_speedup_vs_transformers"] == r["transformers_ttft_ms"] / r["ttft_ms"]
        else:
            assert "transformers_ttft_ms" not in r  # the transformers peer is fp32 only
        if HAS_GENAI:
            assert r["ortgenai_first_token_ms"] >= r["ortgenai_prefill_ms"] > 0 and r["ortgenai_tpot_ms"] > 0
            assert r["tpot_vs_ortgenai"] == r["tpot_ms"] / r["ortgenai_tpot_ms"]
    names = {t["target"] for t in report["targets"]}
    assert {"TTFT(1.0)/TTFT(0.25) fopru", "int4 TPOT / fp32 TPOT (worst)",
            "TTFT speedup vs transformers eager (worst)"} <= names
    if HAS_GENAI:
        assert "runtime TPOT / ONNX Runtime GenAI TPOT, int4 (worst)" in names
    else:
        assert report["peers"]["onnxruntime-genai"].startswith("skipped")
    table = (out / "results.md").read_text()
    assert f"| fopru | 0.25 | {k} |" in table and ("ORT GenAI TPOT ms" in table) == HAS_GENAI
    for png in ("ttft_vs_keep.png", "stages.png"):
        assert Image.open(out / png).size[0] > 300


def test_targets_are_computed_from_the_rows():
    rows = [
        {"method": "fopru", "keep": 1.0, "ttft_ms": 300.0, "prune_overhead": 1.0, "tpot_over_bare_step": 1.05,
         "decoder_precision": "fp32", "tpot_ms": 4.0, "tpot_vs_ortgenai": 0.9, "prefill_vs_ortgenai": 1.0},
        {"method": "fopru", "keep": 0.25, "ttft_ms": 100.0, "prune_overhead": 1.04, "tpot_over_bare_step": 1.2,
         "decoder_precision": "fp32", "tpot_ms": 3.0, "tpot_vs_ortgenai": 1.1, "prefill_vs_ortgenai": 1.0},
        {"method": "fopru", "keep": 0.25, "ttft_ms": 90.0, "prune_overhead": 1.0, "tpot_over_bare_step": 1.0,
         "decoder_precision": "int4", "tpot_ms": 1.2, "tpot_vs_ortgenai": 0.95, "prefill_vs_ortgenai": 1.2},
    ]
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    assert targets["TTFT(1.0)/TTFT(0.25) fopru"]["measured"] == 3.0 and targets["TTFT(1.0)/TTFT(0.25) fopru"]["met"]
    assert not targets["vision+prune / vision-only fopru (worst bucket)"]["met"]
    assert targets["runtime TPOT / bare decoder step (worst)"]["measured"] == 1.2
    assert targets["runtime TPOT / ONNX Runtime GenAI TPOT, fp32 (worst)"]["measured"] == 1.1
    assert targets["runtime TPOT / ONNX Runtime GenAI TPOT, int4 (worst)"]["met"]
    assert not targets["runtime prefill / ONNX Runtime GenAI prefill, int4 (worst)"]["met"]
    assert targets["int4 TPOT / fp32 TPOT (worst)"]["measured"] == 0.4  # 1.2 / 3.0, the same method and keep
