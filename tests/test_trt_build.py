"""prune-build on CPU: the trtexec command lines per target and precision, pinned layers, decoder profiles, and the
runtime's refusal of engines from another TensorRT or GPU. Building itself needs TensorRT (skipped below)."""

from __future__ import annotations

import json
import shutil

import pytest

from preset_geometry import preset_tokens, spec_k
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.export.targets import TARGETS
from vlmprune.export.trt_build import main as build_main, pinned_layers, plan_jobs, trtexec_command
from vlmprune.runtime.trt_backend import check_engine_compat

N, _ = preset_tokens(ExportRequest.model)  # the bundles' preset (prune-export's default model)
K = spec_k(0.25, N)  # the --keep 0.25 buckets


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    return {
        "trt10": export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=root / "b10", validate=False),
                               Steps(quiet=True)),
        "trt8.5": export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=root / "b85", target="trt8.5",
                                              validate=False), Steps(quiet=True)),
    }


def commands(bundle, target, precision, decoder=False):
    jobs = plan_jobs(bundle.path, bundle.manifest, TARGETS[target], precision, decoder)
    return {j.name: trtexec_command(j, TARGETS[target], precision, 1024) for j in jobs}


def test_pinned_layers_cover_the_pruning_subgraph_and_layernorms(bundles):
    b = bundles["trt10"]
    bucket = next(x for x in b.manifest["vision"]["buckets"] if x["method"] == "gridprune")
    pins = pinned_layers(b.path / bucket["file"])
    assert any(p.startswith("/method/") for p in pins)
    assert any("TopK" in p for p in pins)
    assert sum("LayerNormalization" in p for p in pins) >= 7  # pre-norm + 2 per layer run
    none_pins = pinned_layers(b.path / f"vision_none_k{N}.onnx")
    assert not any("TopK" in p for p in none_pins)  # the unpruned graph has no selection to protect


def test_fp16_on_weakly_typed_targets(bundles):
    cmds = commands(bundles["trt10"], "trt10", "fp16")
    cmd = cmds[f"gridprune-k{K}"]
    assert cmd[0] == "trtexec" and "--fp16" in cmd and "--skipInference" in cmd
    assert "--memPoolSize=workspace:1024" in cmd and "--precisionConstraints=obey" in cmd
    pins = next(a for a in cmd if a.startswith("--layerPrecisions="))
    assert "/method/" in pins and pins.count(":fp32") > 50
    assert any(a.startswith("--layerOutputTypes=") for a in cmd)
    text = cmds["text_encoder"]
    assert {"--minShapes=input_ids:1x1", "--optShapes=input_ids:1x16", "--maxShapes=input_ids:1x77"} <= set(text)


def test_trt85_uses_build_only_and_the_calibration_cache(bundles):
    cmds = commands(bundles["trt8.5"], "trt8.5", "int8")
    cmd = cmds[f"fopru-k{K}"]
    assert "--buildOnly" in cmd and "--skipInference" not in cmd
    assert "--int8" in cmd and any(a.endswith(f"calib/fopru-k{K}.cache") for a in cmd if a.startswith("--calib="))


def test_fp32_disables_tf32_and_pins_nothing(bundles):
    cmd = commands(bundles["trt10"], "trt10", "fp32")[f"gridprune-k{K}"]
    assert "--noTF32" in cmd and not any(a.startswith("--layerPrecisions") for a in cmd) and "--fp16" not in cmd


def test_trt11_is_strongly_typed_only(bundles):
    cmds = commands(bundles["trt10"], "trt11", "int8")
    cmd = cmds[f"gridprune-k{K}"]
    assert "--stronglyTyped" in cmd and "--int8" not in cmd and cmd[1].endswith(f"qdq/vision_gridprune_k{K}.qdq.onnx")
    with pytest.raises(VlmpruneError, match="trt11 has no weakly typed --fp16.*--precision fp16"):
        commands(bundles["trt10"], "trt11", "fp16")


def test_trt11_builds_an_fp16_bundle_strongly_typed(tmp_path):
    b = export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=tmp_path / "b", precision="fp16"),
                      Steps(quiet=True))
    assert b.manifest["precision"] == "fp16" and b.validation["passed"]
    overlaps = [c["index_overlap"] for c in b.validation["checks"] if c["output"] == "kept_indices"]
    assert min(overlaps) >= 0.9
    job = plan_jobs(b.path, b.manifest, TARGETS["trt11"], "fp16", False)[1]
    cmd = trtexec_command(job, TARGETS["trt11"], "fp16", 1024, bundle_precision="fp16")
    assert "--stronglyTyped" in cmd and "--fp16" not in cmd


def test_decoder_profile_spans_prefill_and_decode(bundles):
    cmd = commands(bundles["trt10"], "trt10", "fp16", decoder=True)["decoder"]
    mins = next(a for a in cmd if a.startswith("--minShapes="))
    maxs = next(a for a in cmd if a.startswith("--maxShapes="))
    assert "past_key_values.0.key:1x2x0x32" in mins and "inputs_embeds:1x1x128" in mins
    assert "inputs_embeds:1x1024x128" in maxs and "past_key_values.1.value:1x2x1023x32" in maxs
    assert "attention_mask:1x1024" in maxs


def test_dry_run_for_every_target(bundles, capsys):
    assert build_main.run([str(bundles["trt10"].path), "--dry-run", "--target", "all", "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "# trt8.5: skipped" in out and "re-export with `prune-export --target trt8.5`" in out
    assert "# trt8.6 (JetPack 6.0), precision fp16" in out and "# trt10 (JetPack 6.1/6.2)" in out
    assert "# trt11: skipped" in out
    assert out.count("trtexec --onnx=") == 2 * 3  # 2 buckets + text encoder, on trt8.6 and trt10
    assert build_main.run([str(bundles["trt8.5"].path), "--dry-run", "--target", "trt8.5"]) == 0
    assert "--buildOnly" in capsys.readouterr().out


def test_real_build_refuses_missing_calibration_and_several_targets(bundles, capsys):
    assert build_main.run([str(bundles["trt8.5"].path), "--target", "trt8.5", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "int8/calib/" in err and "--images DIR` on the device, with TensorRT 8.x and its GPU" in err
    assert build_main.run([str(bundles["trt10"].path), "--target", "trt8.6,trt10"]) == 2
    assert "build one target at a time" in capsys.readouterr().err


def test_engine_from_another_tensorrt_or_gpu_is_refused():
    meta = {"trt_version": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7"}
    check_engine_compat(meta, "10.3.0.26", "Orin", "8.7")  # same 10.3.0 release
    with pytest.raises(VlmpruneError, match="built with TensorRT 10.3.0; this machine has TensorRT 8.6.2"):
        check_engine_compat(meta, "8.6.2", "Orin", "8.7")
    with pytest.raises(VlmpruneError, match=r"built for Orin \(compute 8.7\); this machine has NVIDIA A100"):
        check_engine_compat(meta, "10.3.0", "NVIDIA A100", "8.0")


@pytest.mark.tensorrt
def test_build_and_run_an_engine(bundles):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (no GPU, PyPI stubs only)")
    if shutil.which("trtexec") is None:
        pytest.skip("trtexec (TensorRT) is not installed on this machine")
    assert build_main.run([str(bundles["trt10"].path), "--target", "trt10", "--precision", "fp32"]) == 0
    manifest = json.loads((bundles["trt10"].path / "manifest.json").read_text())
    assert "trt10-fp32" in manifest["engines"]


def test_fp32_pins_follow_the_family_scopes_in_the_manifest(tmp_path):
    """prune-build and prune-calibrate pin what the bundle's model family declares, not LLaVA's names."""
    import onnx
    from onnx import TensorProto, helper

    from vlmprune.export.trt_build import fp32_pattern, pinned_layers

    nodes = [helper.make_node("Relu", ["x"], [f"y{i}"], name=name) for i, name in
             enumerate(["/blocks.0/norm1/Mul", "/method/TopK", "/blocks.0/attn/qkv/MatMul", "/merger/ln_q/Mul"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1]) for i in range(4)])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    qwen = {"vision": {"fp32_scopes": [r"(^|/)method/", r"norm|ln_q|RMSNorm"]}}
    assert pinned_layers(path, fp32_pattern(qwen)) == ["/blocks.0/norm1/Mul", "/method/TopK", "/merger/ln_q/Mul"]
    # version 2 recorded them with the family only: read as version 3, they move to vision.fp32_scopes
    from vlmprune.manifest import upgrade_v2

    v2 = upgrade_v2({"model": {"family": {"fp32_scopes": qwen["vision"]["fp32_scopes"]}}, "vision": {"buckets": []}})
    assert pinned_layers(path, fp32_pattern(v2)) == ["/blocks.0/norm1/Mul", "/method/TopK", "/merger/ln_q/Mul"]
    # a bundle written before families were recorded keeps LLaVA-1.5's scopes
    assert pinned_layers(path, fp32_pattern({"vision": {}})) == ["/method/TopK"]
