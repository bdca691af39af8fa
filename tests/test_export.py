"""prune-export on the tiny preset: every method at two buckets, validated; manifest; atomic writes; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from preset_geometry import preset_tokens, spec_k
from vlmprune.bundle import load_manifest
from vlmprune.errors import VlmpruneError
from vlmprune.export.cli import main as export_main
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.models import PRESETS
from vlmprune.prune import METHODS

N, GRID = preset_tokens(ExportRequest.model)  # the bundles' preset (prune-export's default model)
SIZE = PRESETS[ExportRequest.model].image_size
Q, H = spec_k(0.25, N), spec_k(0.5, N)  # the buckets of --keep 0.25,0.5
EXPECTED_K = {"fopru": [Q, H], "gprune": [Q, H], "gridprune": [Q, H], "l2norm": [Q, H],
              "pool": [N // 4], "none": []}  # pool: N/4 whatever the ratio; none: only the unpruned bucket


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name in METHODS:
        req = ExportRequest(method=name, keeps=[0.25, 0.5], out=root / name)
        out[name] = export_bundle(req, Steps(quiet=True))
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_two_buckets_and_validates(bundles, name):
    result = bundles[name]
    manifest = load_manifest(result.path)
    ks = [b["k"] for b in manifest["vision"]["buckets"]]
    assert ks == [N] + EXPECTED_K[name]
    assert result.validation["passed"]
    checks = result.validation["checks"]
    index_checks = [c for c in checks if c["output"] == "kept_indices"]
    assert len(index_checks) == 2 * len(ks) and all(c["indices_equal"] for c in index_checks)
    assert any(c["graph"] == "decoder.onnx" and c["case"] == "steps with cache" and c["passed"] for c in checks)
    assert json.loads((result.path / "validation.json").read_text())["passed"]
    for bucket in manifest["vision"]["buckets"]:
        sess = ort.InferenceSession(str(result.path / bucket["file"]), providers=["CPUExecutionProvider"])
        feeds = {"pixel_values": np.zeros((1, 3, SIZE, SIZE), np.float32)}
        if any(i["name"] == "text_embeds" for i in bucket["inputs"]):
            feeds["text_embeds"] = np.ones((1, manifest["text_encoder"]["projection_dim"]), np.float32)
        embeds, kept = sess.run(None, feeds)
        assert embeds.shape == (1, bucket["k"], manifest["decoder"]["hidden_size"])
        assert kept.shape == (1, bucket["k"]) and np.all(np.diff(kept[0]) > 0)
        assert bucket["outputs"][0]["shape"] == [1, bucket["k"], manifest["decoder"]["hidden_size"]]


def test_fopru_quarter_returns_a_quarter_of_the_tokens_and_lints_clean(bundles):
    manifest = load_manifest(bundles["fopru"].path)
    bucket = next(b for b in manifest["vision"]["buckets"] if b["keep"] == 0.25)
    assert bucket["k"] == Q
    for graph, per_target in manifest["lint"].items():
        for target in ("trt8.6", "trt10", "trt11"):
            assert per_target[target]["ok"], (graph, target, per_target[target]["findings"][:3])


def test_gridprune_bundle_has_a_text_encoder(bundles):
    manifest = load_manifest(bundles["gridprune"].path)
    text = manifest["text_encoder"]
    assert text["file"] == "text_encoder.onnx" and (bundles["gridprune"].path / "clip_tokenizer.json").exists()
    bucket = manifest["vision"]["buckets"][1]
    assert [i["name"] for i in bucket["inputs"]] == ["pixel_values", "text_embeds"]


def test_encoder_stops_at_the_feature_layer_and_exports_no_attention_output(bundles):
    path = bundles["fopru"].path / f"vision_fopru_k{Q}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    names = " ".join(n.name for n in model.graph.node)
    assert "layers.2" in names and "layers.3" not in names  # 4 layers, features from the penultimate (index 2)
    assert [o.name for o in model.graph.output] == ["image_embeds", "kept_indices"]


def test_manifest_checksums_cover_every_file_and_detect_changes(bundles, tmp_path):
    src = bundles["fopru"].path
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    load_manifest(copy)
    listed = set(json.loads((copy / "record.json").read_text())["files"])
    on_disk = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} - {"record.json"}
    assert listed == on_disk and "manifest.json" in listed  # every file the export wrote, the manifest included
    with open(copy / "vision.weights", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01\x02")
    with pytest.raises(VlmpruneError, match="vision.weights .* does not match its checksum"):
        load_manifest(copy)
    (copy / "decoder.onnx").unlink()
    with pytest.raises(VlmpruneError, match="decoder.onnx is missing"):
        load_manifest(copy, verify=True)


def test_buckets_share_one_copy_of_the_encoder_weights(tmp_path):
    def size(p):
        return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())

    one = export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=tmp_path / "one", validate=False), Steps(quiet=True))
    four = export_bundle(
        ExportRequest(method="fopru", keeps=[0.111, 0.25, 0.5, 0.75], out=tmp_path / "four", validate=False),
        Steps(quiet=True),
    )
    assert len(four.manifest["vision"]["buckets"]) == 5
    assert size(four.path) <= 1.15 * size(one.path)
    vision = lambda p: sum(f.stat().st_size for f in Path(p).glob("vision*"))  # noqa: E731
    assert vision(four.path) <= 1.15 * vision(one.path)


def test_target_trt85_writes_opset_16_and_passes_its_lint(tmp_path):
    result = export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=tmp_path / "b", target="trt8.5"),
                           Steps(quiet=True))
    for f in result.path.glob("*.onnx"):
        if f.name == "decoder_fused.onnx":  # ONNX Runtime's decoder (its builder's opset), not a TensorRT input
            continue
        model = onnx.load(str(f), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import}[""] == 16
        assert model.ir_version <= 8
        assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert all(g["trt8.5"]["ok"] for g in result.manifest["lint"].values())


def test_fp16_keeps_layernorm_and_the_pruning_subgraph_in_fp32(tmp_path):
    result = export_bundle(ExportRequest(method="gprune", keeps=[0.25], out=tmp_path / "b", precision="fp16"),
                           Steps(quiet=True))
    assert result.manifest["precision"] == "fp16" and result.validation["precision"] == "fp16"
    model = onnx.load(str(result.path / f"vision_gprune_k{Q}.onnx"))
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    size = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    by_type = lambda dt: sum(size[n] for n, d in dtypes.items() if d == dt)  # noqa: E731
    assert by_type(onnx.TensorProto.FLOAT16) > 2 * by_type(onnx.TensorProto.FLOAT)  # the encoder's weights
    by_output = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert dtypes[node.input[1]] == onnx.TensorProto.FLOAT
        if node.op_type == "TopK":  # the selection runs on an fp32 key
            assert by_output[node.input[0]].name.startswith("/method/")
    assert all(c["passed"] for c in result.validation["checks"])


def test_row_strategy_records_what_it_returns(tmp_path):
    result = export_bundle(
        ExportRequest(method="fopru", keeps=[0.111], options={"strategy": "row"}, out=tmp_path / "b", validate=True),
        Steps(quiet=True),
    )
    bucket = result.manifest["vision"]["buckets"][1]
    assert bucket["k"] == 72 and bucket["keep"] == 0.111 and bucket["options"] == {"strategy": "row", "scores": "probs"}


# --- atomic writes and bad input -------------------------------------------------------------------------------------


def test_existing_folder_needs_force_and_force_replaces_only_a_bundle(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert export_main.run(["--method", "fopru", "--keep", "0.25", "--out", str(out), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    args = ["--method", "fopru", "--keep", "0.25", "--out", str(out), "--quiet", "--force", "--no-validate"]
    assert export_main.run(args) == 2  # a folder of the user's files is not a bundle: never deleted
    assert "--force replaces only a vlmprune bundle" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    (out / "manifest.json").write_text(json.dumps({"created_by": {"vlmprune": "0.1.0"}}))  # a (broken) bundle
    assert export_main.run(args) == 0
    assert export_main.run(args) == 0  # and a bundle replaces a bundle
    assert (out / "manifest.json").exists() and (out / "record.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder, sidecar or lock left


def test_failed_validation_publishes_nothing(tmp_path, monkeypatch):
    from vlmprune.export import exporter

    real = exporter.summarise

    def failing(checks, precision, decoder=None):
        summary = real(checks, precision, decoder)
        summary["passed"] = False
        summary["checks"][0]["passed"] = False
        return summary

    monkeypatch.setattr(exporter, "summarise", failing)
    with pytest.raises(VlmpruneError, match="validation failed .* no bundle was published"):
        export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=tmp_path / "b"), Steps(quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from vlmprune.export import exporter

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "save_graph", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=tmp_path / "b"), Steps(quiet=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "fastv", "--keep", "0.25"], "unknown pruning method 'fastv'"),
        (["--method", "fopru", "--keep", "0"], r"keep ratio 0.0 is outside \(0, 1\]"),
        (["--method", "fopru", "--keep", "1.5"], r"keep ratio 1.5 is outside \(0, 1\]"),
        (["--method", "fopru", "--tokens", str(N + 24)], f"K={N + 24} tokens is outside 1..N={N}"),
        (["--method", "fopru", "--keep", "a,b"], "is not a comma-separated list"),
        (["--method", "fopru", "--keep", "0.25", "--option", "alpha=1"], "has no option 'alpha'"),
        (["--method", "fopru", "--keep", "0.25", "--model", "nobody/nothing"], "'nobody/nothing' not found"),
        # option ranges from the registry, checked before the model loads (zones against the grid just after)
        (["--method", "gridprune", "--keep", "0.25", "--option", "alpha=5"], r"alpha='5' .* is not in \[0, 1\]"),
        (["--method", "gridprune", "--keep", "0.25", "--option", "tau=0"], r"tau='0' .* is not in \[0.0001, 100\]"),
        (["--method", "gridprune", "--keep", "0.25", "--option", "zones=0"], "zones='0' .* is not integer in"),
        (["--method", "gridprune", "--keep", "0.25", "--option", "zones=100"],
         f"zones=100 exceeds the {GRID[0]}x{GRID[1]} patch grid"),
        (["--method", "gprune", "--keep", "0.25", "--option", "temperature=0"], "temperature='0' .* is not in"),
        (["--method", "gprune", "--keep", "0.25", "--option", "threshold=nan"], r"threshold='nan' .* is not in \[-1, 1\]"),
        (["--method", "gprune", "--keep", "nan"], r"keep ratio nan is outside \(0, 1\]"),
        # family-specific options, refused before the weights load where the family lacks them
        (["--method", "gprune", "--keep", "0.25", "--layouts", "1x2"], "--layouts is an option of LLaVA-NeXT models"),
        (["--method", "gprune", "--keep", "0.25", "--image-size", "448x448"], "--image-size is an option of Qwen2.5-VL"),
        (["--method", "gprune", "--keep", "0.25", "--model", "tiny-llava-next", "--layouts", " , "],
         "--layouts ' , ' names no layout"),
        (["--method", "gprune", "--keep", "0.25", "--model", "tiny-qwen2.5-vl", "--image-size", "448x448,224x224"],
         "a bundle holds one image size for now"),
        (["--method", "gprune", "--keep", "0.25", "--model", "tiny-llava-next", "--layouts", "9x9"],
         "layout '9x9' is not one of this checkpoint's pinpoint layouts"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = export_main.run([*args, "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("prune-export: error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "b").exists()


def test_list_options_shows_ranges_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        export_main.run(["--list-options"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "alpha=0.5  (in [0, 1])" in out and "zones=4  (integer in [1, 1024])" in out
    assert "temperature=0.03  (in [0.0001, 100])" in out and "strategy=rank  (one of rank, row)" in out


def test_pool_buckets_say_the_k_they_hold(bundles):
    bucket = bundles["pool"].manifest["vision"]["buckets"][1]  # asked for 0.25 and 0.5: one bucket, N/4 tokens
    assert bucket["name"] == f"pool-k{N // 4}" and bucket["k"] == N // 4 and bucket["keep"] == 0.25


def test_gridprune_without_clip_is_refused(tmp_path, tiny, capsys):
    folder = tmp_path / "noclip"
    shutil.copytree(tiny.path, folder, ignore=shutil.ignore_patterns("clip"))
    code = export_main.run(["--model", str(folder), "--method", "gridprune", "--keep", "0.25",
                            "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 2
    assert "needs a CLIP text tower" in capsys.readouterr().err
