"""Issue 21: TensorRT and the GPU on first contact. Each test fails on the code before the issue; each names the
TensorRT, Polygraphy, cuda-python or ONNX Runtime source its rule comes from (see also tests/fake_trt.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from fake_trt import OPTIONS, fake_cuda_python, fake_tensorrt, options_for, strict_trtexec
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.export.targets import TARGETS, check_target, parse_trt_version, target_for
from vlmprune.export.trt_build import main as build_main, plan_jobs, trtexec_command

ROOT = Path(__file__).resolve().parents[1]
FLOAT = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-contact")
    return {m: export_bundle(ExportRequest(method=m, keeps=[0.25], out=root / m, validate=False), Steps(quiet=True))
            for m in ("fopru", "gprune", "gridprune")}


def _inferred_types(path: Path) -> tuple[dict, dict]:
    """Node outputs' element types by ONNX's own shape inference (the reference, independent of onnx_nodes)."""
    import onnx
    from onnx import shape_inference

    g = shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) + list(g.input)}
    return types, {n.name: n for n in g.node}


def fresh(bundle, tmp_path: Path) -> Path:
    """A copy of the bundle without the engines other tests built."""
    import shutil

    return Path(shutil.copytree(bundle.path, tmp_path / "copy", ignore=shutil.ignore_patterns("engines")))


def _flag(cmd, name):
    arg = next((a for a in cmd if a.startswith(name + "=")), None)
    return [] if arg is None else [item.rpartition(":")[0] for item in arg.split("=", 1)[1].split(",")]


# --- defect 2: pins on non-float layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fopru", "gprune", "gridprune"])
def test_no_pin_on_a_layer_that_computes_no_float(bundles, method, capsys):
    """NvInfer.h (v10.3.0:724): setOutputType cannot be used on TopK's index output; network validation rejects fp32
    on boolean layers (TensorRT issues 1516, 3570). Old code: 11 of 53 (FoPru) ... 152 of 643 (GridPrune) pins."""
    b = bundles[method]
    jobs = plan_jobs(b.path, b.manifest, TARGETS["trt10"], "fp16", False)
    bucket = next(j for j in jobs if j.name.startswith(method))
    cmd = trtexec_command(bucket, TARGETS["trt10"], "fp16", 1024)
    types, nodes = _inferred_types(bucket.onnx)
    precisions, outputs = _flag(cmd, "--layerPrecisions"), _flag(cmd, "--layerOutputTypes")
    assert len(precisions) > 20 and any(nodes[n].op_type == "TopK" for n in precisions)  # the selection stays fp32
    for name in outputs:
        assert all(types[o] in FLOAT for o in nodes[name].output if o), (name, nodes[name].op_type)
    for name in precisions:
        assert types[nodes[name].output[0]] in FLOAT, (name, nodes[name].op_type)
    assert not any(nodes[n].op_type == "TopK" for n in outputs)
    # the dry run of every bucket passes the strict trtexec 10.3 (it rejects a pin on a non-float layer)
    assert build_main.run([str(b.path), "--dry-run", "--target", "trt10"]) == 0


def test_strict_trtexec_builds_every_method_at_fp16(bundles, tmp_path, capsys):
    trtexec = strict_trtexec(tmp_path, "10.3.0")
    for method, b in bundles.items():
        assert build_main.run([str(b.path), "--target", "trt10", "--precision", "fp16", "--trtexec", str(trtexec)]) == 0, \
            capsys.readouterr().err
        assert (b.path / "engines" / "trt10-fp16" / f"{method}-k144.engine").exists()


def test_strict_trtexec_refuses_what_tensorrt_refuses(bundles, tmp_path):
    import subprocess

    trtexec = strict_trtexec(tmp_path, "10.3.0")
    b = bundles["fopru"]
    bucket = next(x for x in b.manifest["vision"]["buckets"] if x["method"] == "fopru")
    types, nodes = _inferred_types(b.path / bucket["file"])
    greater = next(n for n, node in nodes.items() if node.op_type == "Greater")
    run = lambda *a: subprocess.run([str(trtexec), f"--onnx={b.path / bucket['file']}", *a], capture_output=True, text=True)
    assert run(f"--layerPrecisions={greater}:fp32").returncode == 1
    assert "computes no float" in run(f"--layerPrecisions={greater}:fp32").stdout
    assert run("--buildOnly").returncode == 1 and "Unknown option: --buildOnly" in run("--buildOnly").stdout
    assert "calibration on random data" in run("--int8").stdout
    assert run("--fp16", "--skipInference").returncode == 0


# --- defect 3: int8 builds of graphs without calibration ------------------------------------------------------------------


def test_int8_build_makes_the_text_encoder_and_decoder_fp16(bundles):
    """trtexec's --int8 without --calib calibrates on random data (sampleEngines.cpp v10.3.0:1075 RndInt8Calibrator)."""
    b = bundles["gridprune"]
    for target in ("trt8.6", "trt10"):
        jobs = {j.name: j for j in plan_jobs(b.path, b.manifest, TARGETS[target], "int8", True)}
        for name in ("text_encoder", "decoder"):
            cmd = trtexec_command(jobs[name], TARGETS[target], "int8", 1024)
            assert "--fp16" in cmd and "--int8" not in cmd and not any(a.startswith("--calib") for a in cmd)
        vision = trtexec_command(jobs["gridprune-k144"], TARGETS[target], "int8", 1024)
        assert "--int8" in vision


# --- defect 7 and issue 22: --target against the installed TensorRT -------------------------------------------------------


def test_option_tables_hold_every_flag_prune_build_emits(bundles):
    """Per version, every flag of every command is in that version's sampleOptions.cpp (fixtures/trtexec_options.json)."""
    b = bundles["gridprune"]
    for target, version in (("trt8.6", "8.6.2"), ("trt10", "10.3.0"), ("trt10", "10.13.0"), ("trt11", "11.1.0")):
        opts = options_for(version)
        for precision in ("fp32", "fp16", "int8"):
            try:
                jobs = plan_jobs(b.path, b.manifest, TARGETS[target], precision, True)
                cmds = [trtexec_command(j, TARGETS[target], precision, 1024) for j in jobs]
            except VlmpruneError:
                continue  # trt11 refuses weakly typed fp16 in one line
            for cmd in cmds:
                unknown = [a.split("=")[0] for a in cmd[1:] if a.split("=")[0] not in opts]
                assert not unknown, (target, version, precision, unknown)
    assert "--skipInference" not in options_for("8.5.2") and "--buildOnly" not in options_for("10.3.0")
    assert "--fp16" not in options_for("11.1.0") and "--layerPrecisions" not in options_for("11.1.0")
    assert set(OPTIONS) == {"8.5", "8.6", "10.3", "10.13", "11.1"}


def test_trtexec_version_is_parsed_and_checked_against_the_target():
    assert parse_trt_version("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec") == (8, 5, 2)
    assert parse_trt_version("[TensorRT v100300]") == (10, 3, 0)
    assert parse_trt_version("11.1.0.5") == (11, 1, 0)
    assert target_for((10, 13, 0)) is TARGETS["trt10"] and target_for((8, 4, 3)) is None
    with pytest.raises(VlmpruneError, match=r"--target trt10 needs TensorRT 10.3.x; trtexec is TensorRT 8.5.2") as e:
        check_target(TARGETS["trt10"], (8, 5, 2), "trtexec")
    assert "--target trt8.5" in e.value.fix


@pytest.mark.parametrize("version,target", [("8.5.2", "trt10"), ("10.3.0", "trt8.6"), ("11.1.0", "trt10")])
def test_build_on_a_mismatched_trtexec_is_one_line_and_leaves_nothing(bundles, tmp_path, capsys, version, target):
    path = fresh(bundles["fopru"], tmp_path)
    trtexec = strict_trtexec(tmp_path, version)
    assert build_main.run([str(path), "--target", target, "--trtexec", str(trtexec)]) == 2
    err = capsys.readouterr().err
    assert f"is TensorRT {version}" in err and "[1/" not in err and "Traceback" not in err
    assert not (path / "engines").exists()


def test_build_without_trtexec_prints_no_progress_and_leaves_no_engines_folder(bundles, tmp_path, capsys):
    """Issue 22: `prune-build` without trtexec printed `[1/2] building ...` and left an empty engines/."""
    path = fresh(bundles["gprune"], tmp_path)
    assert build_main.run([str(path), "--target", "trt10", "--trtexec", "no-such-trtexec"]) == 2
    err = capsys.readouterr().err
    assert "no-such-trtexec was not found on PATH" in err and "[1/" not in err
    assert not (path / "engines").exists()


def test_a_build_failing_midway_leaves_no_empty_engines_folder(bundles, tmp_path, capsys):
    path = fresh(bundles["gprune"], tmp_path)
    trtexec = strict_trtexec(tmp_path, "10.3.0")
    trtexec.write_text(trtexec.read_text().replace('if "--saveEngine" in given:', 'if "--fp16" in given:\n    '
                                                   'print("[E] out of memory"); sys.exit(1)\nif "--saveEngine" in given:'))
    assert build_main.run([str(path), "--target", "trt10", "--trtexec", str(trtexec)]) == 2
    assert "trtexec failed for" in capsys.readouterr().err
    assert not (path / "engines").exists()


def test_int8_dry_run_names_only_files_prune_calibrate_writes(bundles, capsys):
    """Issue 22: on 10.x the dry run named int8/calib/*.cache, which prune-calibrate writes only with TensorRT 8.x."""
    b = bundles["fopru"]
    assert build_main.run([str(b.path), "--dry-run", "--precision", "int8", "--target", "trt10"]) == 0
    out, err = capsys.readouterr()
    assert "int8/calib" not in out + err and "int8/qdq/vision_fopru_k144.qdq.onnx" in out
    assert build_main.run([str(b.path), "--dry-run", "--precision", "int8", "--target", "trt8.6"]) == 0
    out, err = capsys.readouterr()
    assert "int8/calib/fopru-k144.cache" in out and "on the device, with TensorRT 8.x and its GPU" in err


# --- defect 1: cuda-python 12 and 13 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["12.4", "12.8", "13.0"])
def test_current_device_on_every_cuda_python_layout(monkeypatch, version):
    """cuda-python 13 removed cuda.cudart (its 13.0.0 release notes); 12.0-12.5 have only cuda.cudart."""
    for name, mod in fake_cuda_python(version).items():
        monkeypatch.setitem(sys.modules, name, mod)
    if version.startswith("13"):
        monkeypatch.setitem(sys.modules, "cuda.cudart", None)  # import fails, as on a real 13 install
    from vlmprune.runtime.trt_backend import current_device

    assert current_device() == {"gpu": "Orin", "compute_capability": "8.7"}


def test_no_device_is_one_line(monkeypatch):
    for name, mod in fake_cuda_python("13.0", present=False).items():
        monkeypatch.setitem(sys.modules, name, mod)
    from vlmprune.runtime.trt_backend import current_device

    with pytest.raises(VlmpruneError, match="no CUDA device is available"):
        current_device()


# --- defects 4, 5 and the last of 11: calibration caches ------------------------------------------------------------------


@pytest.mark.parametrize("version,writes", [("8.6.2", True), ("10.3.0", False), ("11.1.0", False)])
def test_calibration_caches_only_where_they_are_read(monkeypatch, version, writes):
    """Caches for 8.x only (10.x builds the Q/DQ graphs; 11 has no IInt8*Calibrator, pyInt8.cpp is gone in v11.1)."""
    from fake_trt import ORIN
    from vlmprune.calibrate import cache

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    monkeypatch.setattr("vlmprune.runtime.gpu.detect_gpu", lambda *a, **k: ORIN)
    ok, why = cache.calibration_support()
    assert ok is writes and (writes or "Q/DQ" in why)


def test_cache_algorithms_consumers_cannot_read_are_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """trtexec --calib and Polygraphy's Calibrator read entropy caches (polygraphy/backend/trt/calibrator.py:
    BaseClass defaults to IInt8EntropyCalibrator2); a MinMax cache makes trtexec recalibrate on random data."""
    from fake_trt import ORIN
    from vlmprune.calibrate.cli import main as calib_main

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.2"))
    monkeypatch.setattr("vlmprune.runtime.gpu.detect_gpu", lambda *a, **k: ORIN)
    for algo in ("minmax", "percentile"):
        assert calib_main.run([str(tmp_path), "--images", str(tmp_path), "--algo", algo]) == 2
        err = capsys.readouterr().err
        assert f"--algo {algo} cannot make TensorRT 8.x calibration caches" in err and err.count("\n") <= 2


def test_write_cache_uses_the_entropy_calibrator(monkeypatch, tmp_path):
    import types

    trt = fake_tensorrt("8.6.2")
    seen = {}
    poly = types.ModuleType("polygraphy.backend.trt")
    poly.Calibrator = lambda **kw: seen.update(kw) or "calibrator"
    poly.CreateConfig = lambda **kw: kw
    poly.NetworkFromOnnxPath = lambda path: path
    poly.EngineFromNetwork = lambda net, config: (lambda: None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", poly)
    from vlmprune.calibrate.cache import write_cache

    write_cache(tmp_path / "g.onnx", tmp_path / "g.cache", [], "entropy")
    assert seen["BaseClass"] is trt.IInt8EntropyCalibrator2


# --- defect 8: 8-bit MatMulNBits on CUDA ---------------------------------------------------------------------------------


def test_int8_decoder_leaves_cuda_on_onnxruntime_before_1_22():
    """microsoft/onnxruntime PR 24509 "[Cuda] support 8 bits in MatMulNBits" (release 1.22.0)."""
    from fake_trt import ALL_EPS, ORIN, env
    from vlmprune.runtime.stages import StagePlanner

    manifest = {"decoder": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                            "quantization": {"bits": 8}}}
    old = env(ORIN, ALL_EPS)
    old.ort_version = "1.20.1"
    providers, notes = StagePlanner(manifest, None, old).ort_providers(decoder=True)
    assert providers == ["CPUExecutionProvider"] and "from ONNX Runtime 1.22 on (this is 1.20.1)" in notes[-1]
    new = env(ORIN, ALL_EPS)
    new.ort_version = "1.22.0"
    assert StagePlanner(manifest, None, new).ort_providers(decoder=True)[0][0] == "CUDAExecutionProvider"
    int4 = {"decoder": {**manifest["decoder"], "quantization": {"bits": 4}}}
    assert StagePlanner(int4, None, old).ort_providers(decoder=True)[0][0] == "CUDAExecutionProvider"


def test_onnxruntime_tensorrt_provider_keeps_an_engine_cache(bundles, monkeypatch, tmp_path):
    """onnxruntime docs, TensorRT Execution Provider: trt_engine_cache_enable / trt_engine_cache_path."""
    from fake_trt import ALL_EPS, ORIN, env
    from vlmprune.runtime.stages import StagePlanner

    monkeypatch.setenv("VLMPRUNE_CACHE", str(tmp_path))
    b = bundles["gridprune"]
    planner = StagePlanner(b.manifest, None, env(ORIN, ALL_EPS), provider="tensorrt")
    stage = planner.text_encoder()
    trt = stage.provider_options[stage.providers.index("TensorrtExecutionProvider")]
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path / "ort-tensorrt")
    assert "trt_profile_min_shapes" in trt
    vision = planner.vision(b.manifest["vision"]["buckets"][0])
    assert vision.provider_options[0]["trt_engine_cache_enable"] == "True"


# --- defect 9: ModelOpt ---------------------------------------------------------------------------------------------------


def test_modelopt_keeps_fp32_and_matches_each_excluded_name_literally(bundles, monkeypatch, tmp_path):
    """modelopt/onnx/quantization/quantize.py: high_precision_dtype defaults to "fp16"; graph_utils.py
    expand_node_names_from_patterns matches nodes_to_exclude with re.match."""
    import types

    import numpy as np

    seen = {}
    mo = types.ModuleType("modelopt.onnx.quantization")
    mo.quantize = lambda **kw: seen.update(kw)
    for name in ("modelopt", "modelopt.onnx"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", mo)
    from vlmprune.calibrate.qdq import excluded_nodes, quantize

    b = bundles["fopru"]
    src = b.path / "vision_fopru_k144.onnx"
    quantize(src, tmp_path / "q.onnx", [{"pixel_values": np.zeros((1, 3, 4, 4), np.float32)}], "entropy")
    assert seen["high_precision_dtype"] == "fp32"
    names = excluded_nodes(src)
    _, nodes = _inferred_types(src)
    for pattern in seen["nodes_to_exclude"]:
        assert [n for n in nodes if re.match(pattern, n)] in ([n] for n in names)  # each pattern matches one name
    assert len(seen["nodes_to_exclude"]) == len(names)


# --- defects 5 (API) and 6, 10 --------------------------------------------------------------------------------------------


def test_fake_tensorrt_per_version_has_what_the_bindings_have():
    assert hasattr(fake_tensorrt("10.3.0").BuilderFlag, "FP16")
    assert not hasattr(fake_tensorrt("11.1.0").BuilderFlag, "FP16")
    assert not hasattr(fake_tensorrt("11.1.0"), "IInt8EntropyCalibrator2")
    assert not hasattr(fake_tensorrt("11.1.0").NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")


def test_build_via_api_checks_the_installed_tensorrt(bundles, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.1.0"))
    assert build_main.run([str(bundles["fopru"].path), "--via", "api", "--target", "trt10"]) == 2
    err = capsys.readouterr().err
    assert "the tensorrt Python module is TensorRT 11.1.0" in err and "--target trt11" in err


def test_no_claim_of_jetpack_5_which_has_python_3_8():
    """JetPack 5.1 is Ubuntu 20.04 with Python 3.8; pyproject requires Python >= 3.10."""
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()
    assert not any("5.1" in t.jetpack for t in TARGETS.values())
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Deploy on Jetson Orin"):].split("\n\n")[1]
    assert "| 5.1.x | 8.5.2 | `--target trt8.5`" not in table and "5.x | - | not supported (Python 3.8" in table
    assert "JetPack 5.1" not in (ROOT / "Dockerfile").read_text()


def test_x86_image_pins_an_onnxruntime_built_for_its_tensorrt():
    """onnxruntime docs, TensorRT EP requirements: 1.19 -> TensorRT 10.2, 1.20 -> 10.4; the base has 10.3."""
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=nvcr.io/nvidia/tensorrt:24.08-py3" in text
    assert '"onnxruntime-gpu${ORT_GPU_VERSION:-==1.19.2}"' in text
    assert '"cuda-python>=12,<13"' in (ROOT / "pyproject.toml").read_text()


# --- the API path, on the emulated TensorRT Python API --------------------------------------------------------------------


@pytest.mark.parametrize("version,target", [("8.6.2", "trt8.6"), ("10.3.0", "trt10")])
def test_build_via_api_pins_float_layers_only(bundles, monkeypatch, tmp_path, version, target):
    """pyGraph.cpp (v10.3.0:346-352): ILayer.precision / set_output_type; the emulation raises as validation does."""
    from fake_trt import fake_tensorrt_api

    log = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_api(version, log))
    for name, mod in fake_cuda_python("12.8").items():
        monkeypatch.setitem(sys.modules, name, mod)
    path = fresh(bundles["gridprune"], tmp_path)
    assert build_main.run([str(path), "--via", "api", "--target", target, "--precision", "fp16"]) == 0
    assert ("flag", "FP16") in log and ("flag", "OBEY_PRECISION_CONSTRAINTS") in log
    assert sum(1 for e in log if e[0] == "precision") > 100
    assert (path / "engines" / f"{target}-fp16" / "gridprune-k144.engine").read_bytes() == b"engine"


def test_build_via_api_on_tensorrt_11_is_strongly_typed(bundles, monkeypatch, tmp_path):
    """TensorRT 11.1 has no BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS (pyCore.cpp v11.1:1599-1620)."""
    from fake_trt import fake_tensorrt_api

    log = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_api("11.1.0", log))
    for name, mod in fake_cuda_python("13.0").items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    path = fresh(bundles["fopru"], tmp_path)
    assert build_main.run([str(path), "--via", "api", "--target", "trt11", "--precision", "fp32"]) == 0
    assert not any(e[0] in ("flag", "precision") for e in log) and ("clear", "TF32") in log


def test_tensorrt_without_a_gpu_skips_the_caches_with_a_reason(monkeypatch):
    """The old tensorrt_available() tested only the import, so TensorRT without a GPU crashed in the build."""
    from vlmprune.calibrate import cache
    from vlmprune.runtime.gpu import GpuInfo

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.2"))
    monkeypatch.setattr("vlmprune.runtime.gpu.detect_gpu", lambda *a, **k: GpuInfo(False))
    assert cache.calibration_support() == (False, "no NVIDIA GPU here (calibration builds an engine on the GPU)")
