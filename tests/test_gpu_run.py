"""Issue 16 through ``prune-run``: ``--plan`` (the stage report without loading any graph), the stage report printed
once per run and recorded by ``--json``, the warning on a GPU machine and ``--require-gpu``, and a whole request on
engines for vision, text encoder and decoder (emulated on CPU by ``fake_trt``). The last two tests need TensorRT or
CUDA and skip here, saying so."""

from __future__ import annotations

import json
import shutil

import pytest

from fake_trt import ALL_EPS, ORIN, PROMPT, FakeDevice, FakeEngine, FakeTrtBackend, engine_bundle, env, fake_trt
from preset_geometry import preset_tokens, spec_k
from vlmprune.export.exporter import ExportRequest
from vlmprune.export.trt_build import main as build_main
from vlmprune.runtime import pipeline as pipeline_mod
from vlmprune.runtime import stages as stages_mod
from vlmprune.runtime import trt_backend, trt_decoder
from vlmprune.runtime.backends import OrtBackend
from vlmprune.runtime.cli import run_main
from vlmprune.runtime.gpu import detect_gpu
from vlmprune.runtime.trt_decoder import TrtDecoder


N, _ = preset_tokens(ExportRequest.model)  # engine_bundle's preset: a GridPrune bucket at keep 0.25
NONE, PRUNED = f"none-k{N}", f"gridprune-k{spec_k(0.25, N)}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return engine_bundle(tmp_path_factory.mktemp("gpu-run"))


# --- prune-run --plan and the stage report ---------------------------------------------------------------------------


def test_plan_shows_all_three_engines_and_loads_nothing(bundle, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("--plan loaded a graph")

    monkeypatch.setattr(OrtBackend, "__init__", no_loading)
    monkeypatch.setattr(stages_mod, "detect_environment", lambda: env(ORIN, ALL_EPS, tensorrt=True))
    assert run_main.run([str(bundle), "--plan", "--engines", "trt10-fp16"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[1].startswith("plan (NVIDIA GPU: NVIDIA Jetson AGX Orin Developer Kit; ONNX Runtime providers: "
                               "TensorRT, CUDA, CPU; TensorRT installed):")
    for label, file in (("text encoder", "text_encoder"), ("vision+prune", PRUNED), ("decoder", "decoder")):
        line = next(x for x in lines if x.strip().startswith(label))
        assert line.split()[len(label.split())] == "tensorrt" and "cuda:0" in line
        assert f"engines/trt10-fp16/{file}.engine" in line
    assert err == ""  # every model stage on the GPU: no warning
    assert run_main.run([str(bundle), "--plan", "--engines", "trt10-fp16", "--json", "--keep", "1.0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"] and data["bucket"] == NONE and data["warnings"] == []
    assert [(s["stage"], s["backend"]) for s in data["stages"]] == [
        ("preprocess", "numpy"), ("text_encoder", "tensorrt"), ("vision", "tensorrt"), ("decoder", "tensorrt")]


def test_plan_on_this_machine_and_its_messages(bundle, capsys):
    assert run_main.run([str(bundle), "--plan"]) == 0  # no --image or --prompt needed
    out = capsys.readouterr().out
    assert "decoder" in out and "onnxruntime CPU" in out
    assert run_main.run([str(bundle), "--plan", "--engines", "trt10-fp16"]) == 0
    captured = capsys.readouterr()
    if not stages_mod.detect_environment().tensorrt:
        assert "the TensorRT Python module is not installed here" in captured.err
    code = run_main.run([str(bundle), "--plan", "--require-gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    if not detect_gpu().present:
        assert code == 2 and len(err) == 1 and "--require-gpu: no NVIDIA GPU found" in err[0]
    with pytest.raises(SystemExit) as exc:
        run_main.run([str(bundle), "--prompt", "hi"])
    assert exc.value.code == 2 and "--image (or --plan)" in capsys.readouterr().err


def test_run_on_emulated_engines_uses_all_three_and_matches_onnxruntime(bundle, monkeypatch, capsys):
    """``prune-run --engines``: vision, text encoder and decoder through the TensorRT backends (engines emulated on
    CPU), one stage report, and the greedy answer of the ONNX Runtime plain decoder."""
    devices = []

    def fake_decoder(engine_path, meta, spec):
        device = FakeDevice()
        devices.append(device)
        engine = FakeEngine(engine_path.parents[2] / spec["file"], spec, device, narrow=True)
        return TrtDecoder(engine, spec, device, fake_trt)

    monkeypatch.setattr(trt_backend, "TrtBackend", FakeTrtBackend)
    monkeypatch.setattr(trt_decoder, "load_trt_decoder", fake_decoder)
    monkeypatch.setattr(pipeline_mod, "detect_environment", lambda: env(ORIN, ALL_EPS, tensorrt=True))
    FakeTrtBackend.opened = []
    args = [str(bundle), "--image", "sample", "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]
    assert run_main.run([*args, "--engines", "trt10-fp16"]) == 0
    out, err = capsys.readouterr()
    trt = json.loads(out)
    assert [(s["stage"], s["backend"], s["device"]) for s in trt["stages"]][1:] == [
        ("text_encoder", "tensorrt", "cuda:0"), ("vision", "tensorrt", "cuda:0"), ("decoder", "tensorrt", "cuda:0")]
    assert trt["decoder"] == "tensorrt" and trt["warnings"] == [] and err == ""
    assert FakeTrtBackend.opened == [PRUNED, "text_encoder"]
    assert len(devices) == 1 and all(d in ("H2D", "D2H") for d, _, _ in devices[0].copies)
    monkeypatch.setattr(pipeline_mod, "detect_environment", lambda: env())
    assert run_main.run([*args, "--decoder", "plain"]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert ort["stages"][3]["backend"] == "onnxruntime" and ort["stages"][3]["kind"] == "plain"
    assert trt["token_ids"] == ort["token_ids"] and trt["kept_indices"] == ort["kept_indices"]


def test_run_prints_the_stage_report_once_and_warns_on_a_gpu_machine(bundle, monkeypatch, capsys):
    monkeypatch.setattr(pipeline_mod, "detect_environment", lambda: env(ORIN))
    args = [str(bundle), "--image", "sample", "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert run_main.run(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("stages (") for line in err) == 1
    assert [line.split()[0] for line in err if line.startswith("  ")][:4] == ["preprocess", "text", "vision+prune",
                                                                             "decoder"]
    warnings = [line for line in err if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("prune-run: warning: this machine has an NVIDIA GPU")
    loaded = []
    monkeypatch.setattr(OrtBackend, "__init__", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    assert run_main.run([*args, "--require-gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prune-run: error: --require-gpu: the text encoder, decoder would run "
                                               "on the CPU") and loaded == []  # refused before loading anything


# --- on a GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
def test_decoder_engine_on_tensorrt_matches_onnxruntime(bundle, tmp_path):  # pragma: no cover - needs a GPU
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (no GPU, PyPI stubs only)")
    if not detect_gpu().present:
        pytest.skip("needs an NVIDIA GPU: none on this machine")
    from vlmprune.runtime.pipeline import Pipeline
    from vlmprune.sample import make_sample_image

    work = tmp_path / "b"
    shutil.copytree(bundle, work, ignore=shutil.ignore_patterns("engines"))
    assert build_main.run([str(work), "--target", "trt10", "--precision", "fp32", "--decoder", "--via", "api"]) == 0
    pipe = Pipeline(work, engines="trt10-fp32", require_gpu=True)
    chosen = pipe.choose_bucket(0.25)[0]
    assert pipe.decoder_kind == "tensorrt" and [s.backend for s in pipe.stage_report(chosen)][1:] == ["tensorrt"] * 3
    trt = pipe.generate(make_sample_image(), PROMPT, bucket=chosen, max_new_tokens=12)
    ort = Pipeline(work, decoder="plain").generate(make_sample_image(), PROMPT, bucket=chosen, max_new_tokens=12)
    assert trt.token_ids == ort.token_ids


def test_onnxruntime_cuda_keeps_the_cache_in_device_ortvalues(bundle):  # pragma: no cover - needs a GPU
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and an NVIDIA GPU: this ONNX Runtime has no CUDA provider")
    from vlmprune.runtime.pipeline import Pipeline
    from vlmprune.sample import make_sample_image

    pipe = Pipeline(bundle, provider="cuda", decoder="plain", require_gpu=True)
    cpu = Pipeline(bundle, provider="cpu", decoder="plain")
    a = pipe.generate(make_sample_image(), PROMPT, max_new_tokens=8)
    assert all(v.device_name().lower() == "cuda" for v in pipe.decoder.past)
    assert a.token_ids == cpu.generate(make_sample_image(), PROMPT, max_new_tokens=8).token_ids
