"""LLaVA-NeXT (anyres) bundles in reduced precision: the pruning subgraph of every anyres graph is scoped like the
single-view graphs' (so the family's fp32 scopes pin it in fp16 engines and keep it out of INT8), and prune-calibrate
feeds each layout's graph every calibration image tiled onto that layout, reporting the base view and the raster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from vlmprune.bundle import Bundle
from vlmprune.calibrate.cli import main as calibrate_main
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.export.trt_build import fp32_pattern, pinned_layers
from vlmprune.sample import make_sample_image

PRESET = "tiny-llava-next"
LAYOUTS = ["1x2", "2x1"]
# ops that only the pruning computes (the encoder and the projector have none of them)
SELECTION_OPS = {"TopK", "GatherElements", "CumSum", "ScatterElements", "ScatterND"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anyres-int8") / "b"
    return export_bundle(ExportRequest(model=PRESET, method="gprune", keeps=[0.25], family_options={"layouts": LAYOUTS}, out=out,
                                       validate=False, fused_decoder=False), Steps(quiet=True)).path


def test_the_pruning_subgraph_is_pinned_by_the_family_scopes(bundle):
    m = Bundle.open(bundle).manifest
    pattern = fp32_pattern(m)
    for b in m["vision"]["buckets"]:
        path = bundle / b["file"]
        nodes = onnx.load(str(path), load_external_data=False).graph.node
        pinned = set(pinned_layers(path, pattern))
        selection = [n.name for n in nodes if n.op_type in SELECTION_OPS]
        if b["method"] != "none":
            assert selection and all(name in pinned for name in selection), b["name"]
            assert any("/method/" in name for name in pinned)
        encoder_matmuls = [n.name for n in nodes if n.op_type == "MatMul" and "/layers." in n.name
                           and "/method/" not in n.name]
        assert encoder_matmuls and not set(encoder_matmuls) & pinned  # the encoder itself is not pinned


def test_calibration_feeds_every_layout_and_reports_both_parts(bundle, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(500, 260), (260, 500), (400, 400), (900, 300), (300, 300), (640, 480)]):
        rng = np.random.default_rng(i)
        base = np.asarray(make_sample_image(w, h))
        noisy = np.clip(base.astype(int) + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(images / f"{i}.png")
    assert calibrate_main.run([str(bundle), "--images", str(images), "--holdout", "2", "--algo", "minmax"]) == 0
    opened = Bundle.open(bundle, "full")
    int8 = opened.int8().meta
    names = {b["name"] for b in opened.manifest["vision"]["buckets"]}
    assert set(int8["qdq"]) == set(int8["accuracy"]) == names and int8["images"] == 4
    for b in opened.manifest["vision"]["buckets"]:
        model = onnx.load(str(bundle / "int8" / int8["qdq"][b["name"]]), load_external_data=False)
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
        (scope,) = opened.manifest["vision"]["int8_float_scopes"]  # the scoring layer's attention, as recorded
        dequantised = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        scoped = [n for n in model.graph.node if scope in n.name and n.op_type == "MatMul"]
        assert scoped and not any(set(n.input) & dequantised for n in scoped)
        assert [i.name for i in model.graph.input] == [e["name"] for e in b["inputs"]]  # valid_mask included
        report = int8["accuracy"][b["name"]]
        assert report["images"] == 2 and report["embedding_cosine_mean"] > 0.9
        if b["method"] == "none":
            assert report["kept_index_overlap_min"] == 1.0
        else:  # quantisation noise in the features only: the selection itself stays fp32 (before: 0.28)
            assert report["kept_index_overlap_mean"] > 0.8, report
    assert "index overlap" in capsys.readouterr().out
    assert not (bundle / "int8" / "calib" / "pixel_values.npy").exists()  # anyres feeds differ per layout


def test_float_scopes_come_from_the_manifest_and_older_bundles_get_clips():
    from vlmprune.calibrate.cli import _float_scopes

    assert _float_scopes({"vision": {"int8_float_scopes": ["/blocks.7/attn/"]}}) == ("/blocks.7/attn/",)
    older = {"vision": {}, "model": {"vision": {"layers_run": 23}}}
    assert _float_scopes(older) == ("/layers.22/self_attn/",)
    assert _float_scopes({"vision": {}, "model": {"vision": {"layers_run": "23"}}}) == ()
