"""prune-calibrate (Q/DQ in ONNX Runtime, accuracy report) and prune-profile (ORT backend, saved trtexec logs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from preset_geometry import preset_tokens, spec_k
from vlmprune.bundle import Bundle
from vlmprune.calibrate.cli import main as calibrate_main
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.runtime.profile_cli import main as profile_main
from vlmprune.sample import make_sample_image

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
N, _ = preset_tokens(ExportRequest.model)  # the bundle's preset (prune-export's default model)
K = spec_k(0.25, N)
NONE, PRUNED = f"none-k{N}", f"gridprune-k{K}"  # the bundle's two buckets


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    return export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=root / "b", validate=False),
                         Steps(quiet=True)).path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(8):
        rng = np.random.default_rng(i)
        base = np.asarray(make_sample_image(360 + 20 * i, 300))
        noisy = np.clip(base.astype(int) + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(folder / "gray.jpg")  # odd but valid: used
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")  # unreadable: skipped and counted
    return folder


def test_calibrate_writes_qdq_graphs_with_an_accuracy_report(bundle, images, capsys):
    assert calibrate_main.run([str(bundle), "--images", str(images), "--num", "6", "--holdout", "3",
                               "--algo", "minmax"]) == 0
    before = (bundle / "record.json").read_bytes()
    opened = Bundle.open(bundle, "full")  # the export's record is untouched and still holds
    assert (bundle / "record.json").read_bytes() == before and "int8" not in opened.manifest
    int8 = opened.int8().meta  # the calibration's own folder and record, verified
    assert int8["skipped"] == 1 and int8["images"] == 6 and int8["tool"] == "onnxruntime.quantization"
    assert "not written (TensorRT is not installed here" in int8["calibration_caches"]
    assert oct((bundle / "int8" / "qdq").stat().st_mode & 0o777) != oct(0o700)
    for name, rel in int8["qdq"].items():
        rel = "int8/" + rel
        model = onnx.load(str(bundle / rel), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # the pruning subgraph, LayerNorm and softmax stay unquantised
        quantised_inputs = {i for n in model.graph.node if n.op_type == "DequantizeLinear" for i in n.output}
        for node in model.graph.node:
            if node.op_type in ("Softmax", "LayerNormalization", "TopK") or node.name.startswith("/method/"):
                assert not set(node.input) & quantised_inputs, node.name
        report = int8["accuracy"][name]
        assert 0.5 <= report["kept_index_overlap_mean"] <= 1.0 and report["embedding_cosine_mean"] > 0.9
        sess = ort.InferenceSession(str(bundle / rel), providers=["CPUExecutionProvider"])
        assert sess.get_outputs()[1].name == "kept_indices"
    assert int8["accuracy"][NONE]["kept_index_overlap_mean"] == 1.0
    assert "index overlap" in capsys.readouterr().out
    assert (bundle / "int8" / "report.json").exists() and (bundle / "int8" / "calib" / "pixel_values.npy").exists()
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_calibrate_bad_input(bundle, tmp_path, capsys):
    assert calibrate_main.run([str(bundle), "--images", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert calibrate_main.run([str(bundle), "--images", str(tmp_path / "empty")]) == 2
    assert "no images in" in capsys.readouterr().err


def test_profile_onnxruntime_backend(bundle, tmp_path, capsys):
    out = tmp_path / "prof"
    assert profile_main.run([str(bundle), "--backend", "ort", "--iterations", "5", "--warmup", "1",
                             "--out", str(out)]) == 0
    rows = json.loads((out / "profile.json").read_text())
    assert [r["k"] for r in rows] == [N, K]
    for r in rows:
        assert r["min"] <= r["median"] <= r["max"] and r["p90"] <= r["p99"] and r["metric"] == "CPU latency"
    assert (out / "profile.png").stat().st_size > 1000 and f"| {NONE} |" in (out / "profile.md").read_text()
    assert (out / "profile.csv").read_text().splitlines()[0].startswith("name,method,keep,k")


def test_profile_from_logs_matches_bucket_names(bundle, tmp_path):
    log = tmp_path / f"{PRUNED}.log"
    log.write_text((FIXTURES / "nvidia-tensorrt-4177.log").read_text())
    out = tmp_path / "prof"
    assert profile_main.run([str(bundle), "--from-log", str(log), str(FIXTURES / "thu-mig-yolov10-463.log"),
                             "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "profile.json").read_text())}
    assert rows[PRUNED]["keep"] == 0.25 and rows[PRUNED]["median"] == 7.14139
    assert rows["thu-mig-yolov10-463"]["keep"] is None and rows["thu-mig-yolov10-463"]["p99"] == 1.33472


def test_profile_errors(tmp_path, capsys):
    assert profile_main.run([]) == 2
    assert "no bundle given" in capsys.readouterr().err
    empty = tmp_path / "x.log"
    empty.write_text("[I] Engine built.\n")
    assert profile_main.run(["--from-log", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no trtexec performance summary" in capsys.readouterr().err


def test_calibrate_with_few_images_and_no_holdout(bundle, images, tmp_path):
    """Fewer than four images leave none held out (and --holdout 0 asks for that): the report is measured on the
    first calibration image, text-guided buckets included."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    three = tmp_path / "three"
    three.mkdir()
    for name in ("0.png", "1.png", "2.png"):
        shutil.copy(images / name, three / name)
    for folder, extra, used in ((three, [], 3), (images, ["--num", "5", "--holdout", "0"], 5)):
        assert calibrate_main.run([str(copy), "--images", str(folder), *extra, "--algo", "minmax"]) == 0
        meta = Bundle.open(copy).int8().meta
        assert meta["images"] == used and meta["accuracy"][PRUNED]["images"] == 1
