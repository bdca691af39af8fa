"""Streamed export and decoder precisions (fp32, fp16, int8, int4) on the tiny preset; strict checkpoint loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.export.cli import main as export_main

pytestmark = pytest.mark.slow


def _external(model: onnx.ModelProto) -> tuple[int, int, set[str]]:
    """(large tensors stored inline, large tensors stored externally, external file names)."""
    inline = external = 0
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            external += 1
            files |= {e.value for e in t.external_data if e.key == "location"}
        elif len(t.raw_data) >= 1024:
            inline += 1
    return inline, external, files


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("precisions")
    out = {}
    for precision in ("fp16", "int4"):
        path = root / precision
        code = export_main.run(["--method", "fopru", "--keep", "0.25", "--decoder-precision", precision,
                                "--out", str(path), "--quiet"])
        assert code == 0
        out[precision] = path
    return out


def test_decoder_is_written_with_external_data(bundles):
    for precision, path in bundles.items():
        model = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
        inline, external, files = _external(model)
        assert inline == 0 and external > 0 and files == {"decoder.weights"}, precision
        # the graph file holds structure only; the weights file holds the bytes
        assert (path / "decoder.onnx").stat().st_size < (path / "decoder.weights").stat().st_size


def test_precision_is_recorded_and_read_by_the_runtime(bundles):
    from vlmprune.runtime.pipeline import Pipeline

    fp16 = json.loads((bundles["fp16"] / "manifest.json").read_text())["decoder"]
    assert fp16["precision"] == "fp16" and fp16["kv_dtype"] == "float16" and fp16["embeddings"]["dtype"] == "float16"
    assert np.load(bundles["fp16"] / "embed_tokens.npy", mmap_mode="r").dtype == np.float16
    assert "logits" in fp16["fp32_outputs"]
    int4 = json.loads((bundles["int4"] / "manifest.json").read_text())["decoder"]
    assert int4["quantization"]["bits"] == 4 and int4["quantization"]["matmuls"] > 0
    model = onnx.load(str(bundles["int4"] / "decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops
    from vlmprune.sample import make_sample_image

    for precision, path in bundles.items():
        result = Pipeline(path).generate(make_sample_image(), "What is next to the house?", max_new_tokens=6, ignore_eos=True)
        assert result.tokens_generated == 6, precision


def test_validation_reports_greedy_agreement_against_fp32(bundles):
    for precision, path in bundles.items():
        v = json.loads((path / "validation.json").read_text())
        d = v["decoder"]
        assert v["passed"] and d["precision"] == precision
        assert d["greedy_tokens"] == 32 and 0 <= d["greedy_identical_prefix"] <= 32
        assert d["logits_min_cosine"] >= d["tolerance"]["min_cosine"]
    # fp16 keeps the fp32 path on this preset; int4 is measurably further from it
    fp16 = json.loads((bundles["fp16"] / "validation.json").read_text())["decoder"]
    int4 = json.loads((bundles["int4"] / "validation.json").read_text())["decoder"]
    assert fp16["logits_max_abs_diff"]["prefill"] < int4["logits_max_abs_diff"]["prefill"]


def test_a_failing_decoder_check_publishes_nothing(tmp_path, monkeypatch):
    from vlmprune.export import validate

    monkeypatch.setitem(validate.DECODER_TOLERANCE, "fp16", {**validate.DECODER_TOLERANCE["fp16"],
                                                              "min_cosine": 1.01})
    code = export_main.run(["--method", "fopru", "--keep", "0.25", "--decoder-precision", "fp16",
                            "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 2 and not (tmp_path / "b").exists()


def test_default_decoder_precision_follows_the_checkpoint(tiny, tmp_path):
    from vlmprune.models.loading import checkpoint_dtype

    assert checkpoint_dtype(tiny.path) == "F32"
    folder = tmp_path / "fp16ckpt"
    shutil.copytree(tiny.path, folder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_dtype(folder) == "F16"


def _drop_tensors(src: Path, dst: Path, prefix: str) -> int:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return len(tensors) - len(kept)


def test_a_checkpoint_missing_tensors_is_refused_in_one_line(tiny, tmp_path, capsys):
    dropped = _drop_tensors(tiny.path, tmp_path / "partial", "vision_tower.")
    assert dropped > 10
    code = export_main.run(["--model", str(tmp_path / "partial"), "--method", "fopru", "--keep", "0.25",
                            "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"lacks {dropped} tensor(s): model.vision_tower" in err, err
    assert not (tmp_path / "b").exists()


def test_a_clip_that_is_not_clip_is_refused(tiny, tmp_path, capsys):
    code = export_main.run(["--method", "gridprune", "--keep", "0.25", "--clip", str(tiny.path),
                            "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a CLIP model with a text tower" in err


def test_a_clip_missing_its_text_tower_is_refused(tiny, tmp_path, capsys):
    dropped = _drop_tensors(tiny.path / "clip", tmp_path / "clip", "text_model")
    assert dropped > 5
    code = export_main.run(["--method", "gridprune", "--keep", "0.25", "--clip", str(tmp_path / "clip"),
                            "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"lacks {dropped} tensor(s): text_model" in err


def test_weights_file_streams_and_deduplicates(tmp_path):
    """Tensors torch wrote to their own files and inline ones land once each, page-aligned, with exact bytes."""
    from onnx import helper, numpy_helper

    from vlmprune.export.onnx_io import WeightsFile

    a = np.arange(4096, dtype=np.float32).reshape(64, 64)
    src = tmp_path / "src"
    src.mkdir()
    a.tofile(src / "w_a")
    ext = onnx.TensorProto(name="a", data_type=onnx.TensorProto.FLOAT, dims=[64, 64])
    ext.data_location = onnx.TensorProto.EXTERNAL
    ext.external_data.add(key="location", value="w_a")
    same = numpy_helper.from_array(a, "a_again")  # the same bytes inline: stored once
    other = numpy_helper.from_array(a + 1, "b")
    small = numpy_helper.from_array(np.ones(3, np.float32), "small")  # stays inline
    graph = helper.make_graph([], "g", [], [], initializer=[ext, same, other, small])
    model = helper.make_model(graph)
    with WeightsFile(tmp_path / "x.weights") as w:
        w.add_model(model, src)
    offsets = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    assert offsets["a"]["offset"] == offsets["a_again"]["offset"]
    assert offsets["b"]["offset"] != offsets["a"]["offset"] and int(offsets["b"]["offset"]) % 4096 == 0
    assert model.graph.initializer[3].data_location != onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(tmp_path / "g.onnx"))
    loaded = onnx.load(str(tmp_path / "g.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), a)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[2]), a + 1)
    assert (tmp_path / "x.weights").stat().st_size == 2 * a.nbytes  # a (its duplicate taken back), then b


def test_bad_decoder_precision_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main.run(["--method", "fopru", "--keep", "0.25", "--decoder-precision", "int3",
                         "--out", str(tmp_path / "b")])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(VlmpruneError, match="unknown decoder precision"):
        from vlmprune.export.exporter import ExportRequest, export_bundle

        export_bundle(ExportRequest(method="fopru", keeps=[0.25], decoder_precision="int3", out=tmp_path / "c"))
