"""Issue 16: the whole request on the GPU. On this CPU machine: where each stage runs (backend selection, the
warnings and ``--require-gpu``), GPU detection, the optimisation profile, the Jetson image's onnxruntime-gpu source,
and the TensorRT decoder's binding plan, run for real against an emulated engine and device (``fake_trt``): the KV
cache stays in device buffers that swap roles, and each token copies only its embedding, its position and the
logits. ``test_gpu_run.py`` has ``prune-run`` (``--plan``, the stage report) and the tests that need a GPU."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from fake_trt import ALL_EPS, ORIN, FakeDevice, FakeEngine, engine_bundle, env, fake_trt
from vlmprune.bundle import Bundle
from vlmprune.errors import VlmpruneError
from vlmprune.export.targets import TARGETS
from vlmprune.export.trt_build import plan_jobs, trtexec_command
from vlmprune.runtime.backends import OrtBackend, OrtDecoder
from vlmprune.runtime.gpu import JETSON_ORT_INDEX, GpuInfo, detect_gpu
from vlmprune.runtime.stages import StagePlanner
from vlmprune.runtime.trt_decoder import TrtDecoder, binding_plan, manifest_dtypes
from vlmprune.runtime.trt_profile import decoder_profile, shape_strings




@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return engine_bundle(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def opened(bundle):
    return Bundle.open(bundle)


def planner(opened, environment, engines=None, manifest=None, **kw) -> StagePlanner:
    derived = opened.engines(engines) if engines else None
    return StagePlanner(manifest or opened.manifest, derived, environment, **kw)


def bucket(opened, keep=0.25):
    return next(b for b in opened.manifest["vision"]["buckets"] if b["keep"] == keep)


# --- the optimisation profile: one definition for prune-build, the engine check and ORT's TensorRT provider --------


def test_decoder_profile_is_the_one_prune_build_builds(opened):
    jobs = plan_jobs(opened.folder, opened.manifest, TARGETS["trt10"], "fp16", True)
    cmd = trtexec_command(next(j for j in jobs if j.name == "decoder"), TARGETS["trt10"], "fp16", 1024)
    shapes = shape_strings(decoder_profile(opened.manifest["decoder"]))
    for key in ("min", "opt", "max"):
        assert f"--{key}Shapes={shapes[key]}" in cmd
    prof = decoder_profile(opened.manifest["decoder"])
    c = opened.manifest["decoder"]["max_context"]
    assert prof["inputs_embeds"][2][1] == c and prof["past_key_values.0.key"][2][2] == c - 1  # prefill, decode
    assert prof["attention_mask"][0] == (1, 1) and prof["past_key_values.1.value"][0][2] == 0


# --- the TensorRT decoder on an emulated engine -------------------------------------------------------------------


def _trt_decoder(opened, narrow=False, profile=None, capacity=None):
    spec = opened.manifest["decoder"]
    device = FakeDevice()
    engine = FakeEngine(opened.folder / spec["file"], spec, device, narrow=narrow, profile=profile)
    return TrtDecoder(engine, spec, device, fake_trt, capacity=capacity), engine, device


@pytest.mark.parametrize("narrow", [False, True], ids=["trt10-int64", "trt8-int32"])
def test_trt_decoder_matches_onnxruntime_and_keeps_the_cache_on_the_device(opened, narrow):
    spec = opened.manifest["decoder"]
    dec, engine, device = _trt_decoder(opened, narrow=narrow)
    ort = OrtDecoder(OrtBackend(opened.folder / spec["file"], "cpu"), spec)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, 37, spec["hidden_size"])).astype(np.float32)
    positions = np.arange(37)[None]
    for run in range(2):  # a second request on the same buffers (reset, no reallocation)
        dec.reset()
        ort.reset()
        np.testing.assert_allclose(dec.step(prompt, positions), ort.step(prompt, positions), rtol=1e-4, atol=1e-5)
        allocated, copies = device.allocated, len(device.copies)
        for t in range(37, 45):
            x = rng.standard_normal((1, 1, spec["hidden_size"])).astype(np.float32)
            pos = np.array([[t]])
            np.testing.assert_allclose(dec.step(x, pos), ort.step(x, pos), rtol=1e-4, atol=1e-5)
        assert device.allocated == allocated  # decode steps allocate nothing on the device
        steps = device.copies[copies:]
        plan = dec.plan
        per_step = [(c.direction, c.nbytes) for c in plan.decode]
        assert [(d, n) for d, _, n in steps] == per_step * 8  # embedding + position in, last logits out: nothing else
        assert per_step == [("H2D", spec["hidden_size"] * 4), ("H2D", 4 if narrow else 8), ("D2H", spec["vocab_size"] * 4)]
    runs = engine.runs[-9:]
    for before, after in zip(runs, runs[1:]):  # this step's present buffers are the next step's past buffers
        for i in range(spec["num_layers"]):
            for kind in ("key", "value"):
                assert after["addresses"][f"past_key_values.{i}.{kind}"] == before["addresses"][f"present.{i}.{kind}"]
                assert after["addresses"][f"present.{i}.{kind}"] == before["addresses"][f"past_key_values.{i}.{kind}"]
        grown = before["shapes"]["past_key_values.0.key"][2] + before["shapes"]["inputs_embeds"][1]
        assert after["shapes"]["past_key_values.0.key"][2] == grown
    # the mask is one device row uploaded once and bound with the current length
    assert len({r["addresses"]["attention_mask"] for r in engine.runs}) == 1
    assert runs[-1]["shapes"]["attention_mask"] == (1, 45)
    assert plan.kv_bytes == 2 * 2 * spec["num_layers"] * spec["max_context"] * spec["num_kv_heads"] * spec["head_dim"] * 4


def test_trt_decoder_refuses_engines_and_requests_that_do_not_fit(opened):
    spec = opened.manifest["decoder"]
    short = copy.deepcopy(decoder_profile(spec))
    for name, (lo, opt, hi) in list(short.items()):
        if name.startswith("past_key_values"):
            short[name] = (lo, opt, (1, hi[1], 255, hi[3]))
    with pytest.raises(VlmpruneError, match=r"optimisation profile does not cover.*allows 1x2x0x32..1x2x255x32") as exc:
        _trt_decoder(opened, profile=short)
    assert "prune-build BUNDLE --decoder" in exc.value.fix
    dec, _, _ = _trt_decoder(opened, capacity=40)
    dec.step(np.zeros((1, 39, spec["hidden_size"]), np.float32), np.arange(39)[None])
    dec.step(np.zeros((1, 1, spec["hidden_size"]), np.float32), np.array([[39]]))
    with pytest.raises(VlmpruneError, match="would reach 41 tokens, beyond the decoder's cache of 40"):
        dec.step(np.zeros((1, 1, spec["hidden_size"]), np.float32), np.array([[40]]))

    class NoPresent(FakeEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.names = [n for n in self.names if n != "present.1.value"]

    device = FakeDevice()
    with pytest.raises(VlmpruneError, match="lacks the tensors present.1.value"):
        TrtDecoder(NoPresent(opened.folder / spec["file"], spec, device), spec, device, fake_trt)


def test_binding_plan_at_llava_7b_scale():
    spec = {"num_layers": 32, "num_kv_heads": 32, "head_dim": 128, "hidden_size": 4096, "vocab_size": 32064,
            "max_context": 4096,
            "inputs": [{"name": "inputs_embeds", "dtype": "float16", "kind": "inputs_embeds"},
                       {"name": "attention_mask", "dtype": "int64", "kind": "attention_mask"},
                       {"name": "position_ids", "dtype": "int64", "kind": "position_ids", "shape": [1, 1]}]
                      + [{"name": f"past_key_values.{i}.{k}", "dtype": "float16", "kind": f"past_{k}", "layer": i}
                         for i in range(32) for k in ("key", "value")],
            "outputs": [{"name": "logits", "dtype": "float32", "kind": "logits"}]
                       + [{"name": f"present.{i}.{k}", "dtype": "float16", "kind": f"present_{k}", "layer": i}
                          for i in range(32) for k in ("key", "value")]}
    plan = binding_plan(spec, 4096, manifest_dtypes(spec, "10.3.0"))
    assert plan.kv_bytes == 4 << 30  # 2 GiB of fp16 cache, twice (past and present buffers)
    assert [(c.tensor, c.direction, c.nbytes) for c in plan.decode] == [
        ("inputs_embeds", "H2D", 8192), ("position_ids", "H2D", 8), ("logits", "D2H", 32064 * 4)]
    assert "4.0 GiB" in plan.summary() and "per token H2D 8.0 KiB" in plan.summary()
    jetpack6 = manifest_dtypes(spec, "8.6.2")  # TensorRT 8.x narrows INT64 I/O to INT32
    assert jetpack6["position_ids"] == np.int32 and jetpack6["inputs_embeds"] == np.float16
    assert binding_plan(spec, 4096, jetpack6).decode[1].nbytes == 4


# --- the Jetson image ------------------------------------------------------------------------------------------------


def test_jetson_image_names_its_onnxruntime_gpu_source_and_fails_without_it():
    root = Path(__file__).resolve().parents[1]
    dockerfile = (root / "Dockerfile").read_text()
    assert f"ARG JETSON_ORT_INDEX={JETSON_ORT_INDEX}" in dockerfile and JETSON_ORT_INDEX in (root / "README.md").read_text()
    assert '--index-url "$JETSON_ORT_INDEX" "onnxruntime-gpu${ORT_GPU_VERSION}"' in dockerfile
    # the image's check, run here against this machine's onnxruntime: without a CUDA provider the build stops, saying why
    check = re.search(r'RUN (python3 -c "import onnxruntime as ort.*?")', dockerfile, re.S).group(1).replace("\\\n", "")
    check = check.replace("python3", sys.executable, 1)
    gpu_build = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    strict = subprocess.run(["sh", "-c", check], capture_output=True, text=True, env={**os.environ, "ALLOW_CPU_ORT": "0"})
    allowed = subprocess.run(["sh", "-c", check], capture_output=True, text=True, env={**os.environ, "ALLOW_CPU_ORT": "1"})
    assert allowed.returncode == 0 and strict.returncode == (0 if gpu_build else 1)
    if not gpu_build:
        assert "has no CUDAExecutionProvider, so prune-run would run the decoder on the CPU" in strict.stderr


# --- GPU detection --------------------------------------------------------------------------------------------------


def test_gpu_detection_from_files(tmp_path):
    assert not detect_gpu(tmp_path, which=lambda _: None).present
    jetson = tmp_path / "jetson"
    (jetson / "etc").mkdir(parents=True)
    (jetson / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0")
    (jetson / "proc/device-tree").mkdir(parents=True)
    (jetson / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    info = detect_gpu(jetson, which=lambda _: None)
    assert (info.present, info.kind, info.name) == (True, "jetson", "NVIDIA Jetson AGX Orin Developer Kit")
    dgpu = tmp_path / "dgpu"
    (dgpu / "proc/driver/nvidia/gpus/0000:01:00.0").mkdir(parents=True)
    (dgpu / "proc/driver/nvidia/version").write_text("NVRM version: 550")
    (dgpu / "proc/driver/nvidia/gpus/0000:01:00.0/information").write_text("Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ: 1")
    info = detect_gpu(dgpu, which=lambda name: "/usr/bin/nvidia-smi")
    assert (info.kind, info.name) == ("discrete", "NVIDIA A100-SXM4-40GB") and "nvidia-smi" in info.evidence
    assert detect_gpu(tmp_path / "none", which=lambda name: "/usr/bin/nvidia-smi").present  # nvidia-smi alone counts


# --- backend selection ----------------------------------------------------------------------------------------------


def test_engines_for_every_graph_put_every_model_stage_on_tensorrt(opened):
    p = planner(opened, env(ORIN, ALL_EPS, tensorrt=True), engines="trt10-fp16")
    stages = {s.stage: s for s in p.plan(bucket(opened))}
    pruned = next(b["name"] for b in opened.manifest["vision"]["buckets"] if b["method"] == "gridprune")
    for name, file in (("text_encoder", "text_encoder.engine"), ("vision", f"{pruned}.engine"),
                       ("decoder", "decoder.engine")):
        assert (stages[name].backend, stages[name].device, stages[name].file) == (
            "tensorrt", "cuda:0", f"engines/trt10-fp16/{file}")
    assert stages["preprocess"].device == "cpu"
    assert "KV cache in device memory" in stages["decoder"].detail and "past/present swapped" in stages["decoder"].detail
    assert p.check_devices(list(stages.values()), require_gpu=True) == []
    # --decoder plain keeps the decoder on ONNX Runtime (CUDA here) and says the engine is unused
    dec = planner(opened, env(ORIN, ALL_EPS, tensorrt=True), engines="trt10-fp16", decoder="plain").decoder()
    assert (dec.backend, dec.providers[0], dec.kind) == ("onnxruntime", "CUDAExecutionProvider", "plain")
    assert "the decoder engine is not used (--decoder plain)" in dec.detail


def test_onnxruntime_on_the_gpu_where_no_engine_is_built(opened):
    p = planner(opened, env(ORIN, ALL_EPS))
    stages = {s.stage: s for s in p.plan(bucket(opened))}
    assert stages["vision"].providers == ALL_EPS and stages["vision"].device == "cuda:0"
    dec = stages["decoder"]  # the TensorRT provider is left out for the growing cache; CUDA with device OrtValues
    assert dec.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and dec.device == "cuda:0"
    assert "KV cache in device OrtValues" in dec.detail or "device memory" in dec.detail
    fused = opened.manifest.get("decoder_fused")
    if fused and "CUDAExecutionProvider" not in fused["providers"]:  # an fp32 fused graph is for the CPU provider
        assert dec.kind == "plain" and "not fused: the fused decoder is for CPUExecutionProvider" in dec.detail
    assert p.check_devices(list(stages.values())) == []
    # asked for by name, ONNX Runtime's TensorRT provider gets the manifest's optimisation profile, like the engine
    trt = planner(opened, env(ORIN, ALL_EPS), provider="tensorrt").decoder()
    shapes = shape_strings(decoder_profile(opened.manifest["decoder"]))
    assert trt.providers[0] == "TensorrtExecutionProvider"
    options = trt.provider_options[0]
    assert {k: v for k, v in options.items() if k.startswith("trt_profile")} == {
        f"trt_profile_{k}_shapes": shapes[k] for k in ("min", "opt", "max")}
    assert options["trt_engine_cache_enable"] == "True"  # issue 21: no engine rebuild on every start
    text = planner(opened, env(ORIN, ALL_EPS), provider="tensorrt").text_encoder()
    assert text.provider_options[0]["trt_profile_max_shapes"] == "input_ids:1x77"


def test_fused_decoder_on_cuda_when_the_bundle_has_one_for_it(opened):
    manifest = copy.deepcopy(opened.manifest)
    manifest["decoder_fused"] = manifest.get("decoder_fused") or {"file": "decoder.onnx", "buffer_length": 1024,
                                                                  "positions": "contiguous"}
    manifest["decoder_fused"]["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # an fp16 fused graph
    dec = planner(opened, env(ORIN, ALL_EPS), manifest=manifest).decoder()
    assert (dec.kind, dec.providers[0], dec.file) == ("fused", "CUDAExecutionProvider", manifest["decoder_fused"]["file"])
    assert "KV buffer of 1024 tokens in device memory, written in place" in dec.detail
    with pytest.raises(VlmpruneError, match="cannot use the fused decoder: .*--positions original.*; use --decoder plain$"):
        planner(opened, env(ORIN, ALL_EPS), manifest=manifest, decoder="fused", positions="original").decoder()


def test_int4_decoder_runs_where_matmulnbits_does(opened):
    manifest = copy.deepcopy(opened.manifest)
    manifest["decoder"].update(quantization={"bits": 4, "block_size": 32},
                               providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    manifest["decoder_fused"] = None
    auto = planner(opened, env(ORIN, ALL_EPS), manifest=manifest).decoder()
    assert auto.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and auto.device == "cuda:0"
    p = planner(opened, env(ORIN, ALL_EPS), manifest=manifest, provider="tensorrt")
    forced = p.decoder()
    assert forced.providers == ["CPUExecutionProvider"] and "int4 MatMulNBits runs on CPU, CUDA only" in forced.detail
    [line] = p.check_devices([forced])
    assert "the decoder would run on the CPU: the decoder graph runs on CPU, CUDA only" in line
    assert line.endswith("fix: use --provider cuda")


def test_a_gpu_machine_with_a_cpu_only_onnxruntime_is_told_the_fix(opened):
    p = planner(opened, env(ORIN))
    stages = p.plan(bucket(opened))
    [line] = p.check_devices(stages)
    assert line.startswith("warning: this machine has an NVIDIA GPU (NVIDIA Jetson AGX Orin Developer Kit), but the "
                           "text encoder, vision+prune, decoder would run on the CPU: this ONNX Runtime has no GPU "
                           "provider (only CPUExecutionProvider); fix: install the JetPack build of onnxruntime-gpu "
                           "(pip install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126")
    assert "prune-build BUNDLE --decoder` and pass --engines" in line and "\n" not in line
    with pytest.raises(VlmpruneError, match="--require-gpu: the text encoder, vision\\+prune, decoder would run on the CPU"):
        p.check_devices(stages, require_gpu=True)
    # a discrete GPU gets the PyPI fix; --provider cpu gets "drop it"; a session that lost CUDA says so
    dgpu = GpuInfo(True, "discrete", "NVIDIA A100", ["/dev/nvidia0"])
    assert "pip uninstall onnxruntime && pip install onnxruntime-gpu" in planner(opened, env(dgpu)).check_devices(stages)[0]
    cpu = planner(opened, env(ORIN, ALL_EPS), provider="cpu")
    assert cpu.check_devices(cpu.plan(bucket(opened)))[0].endswith("fix: drop --provider cpu")
    gpu_plan = planner(opened, env(ORIN, ALL_EPS))
    lost = [s.observed(["CPUExecutionProvider"]) if s.stage == "decoder" else s for s in gpu_plan.plan(bucket(opened))]
    [line] = gpu_plan.check_devices(lost)
    assert "the decoder would run on the CPU: ONNX Runtime could not start its GPU provider" in line
    # no GPU: nothing to warn about, but --require-gpu refuses
    none = planner(opened, env())
    assert none.check_devices(none.plan(bucket(opened))) == []
    with pytest.raises(VlmpruneError, match="--require-gpu: no NVIDIA GPU found on this machine"):
        none.check_devices(none.plan(bucket(opened)), require_gpu=True)
