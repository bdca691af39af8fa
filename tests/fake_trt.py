"""A CPU stand-in for the parts of TensorRT and CUDA that ``runtime/trt_decoder.py`` uses, so that its binding plan
runs here for real: device memory is numpy blocks behind integer addresses (reads and writes are bounds-checked, so
a buffer that is too small fails), copies are logged, and "executing the engine" runs the bundle's standard-op
``decoder.onnx`` in ONNX Runtime on the tensors found at the bound addresses, with the bound shapes, and writes the
outputs back to the bound addresses. The engine reports TensorRT's I/O dtypes (``narrow=True``: TensorRT 8.x, INT64
inputs as INT32) and an optimisation profile; ``set_input_shape`` refuses shapes outside it, as TensorRT does.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from vlmprune.runtime.gpu import Environment, GpuInfo
from vlmprune.runtime.trt_profile import decoder_profile

SPAN = 1 << 40  # address space per allocation


class FakeDevice:
    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.copies: list[tuple[str, int, int]] = []  # (direction, address, bytes)
        self.allocated = 0
        self.stream = 12345
        self._next = 1

    def alloc(self, nbytes: int, what: str = "") -> int:
        base = self._next * SPAN
        self._next += 1
        self.blocks[base] = np.zeros(max(int(nbytes), 1), np.uint8)
        self.allocated += 1
        return base

    def free(self, ptr: int) -> None:
        del self.blocks[ptr]

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        base = ptr - ptr % SPAN
        block = self.blocks[base]
        offset = ptr - base
        assert offset + nbytes <= block.size, f"access of {nbytes} bytes at +{offset} overruns a {block.size}-byte buffer"
        return block[offset:offset + nbytes]

    def h2d(self, dst: int, array: np.ndarray) -> None:
        self.view(dst, array.nbytes)[:] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.copies.append(("H2D", dst, array.nbytes))

    def d2h(self, array: np.ndarray, src: int) -> None:
        array.reshape(-1).view(np.uint8)[:] = self.view(src, array.nbytes)
        self.copies.append(("D2H", src, array.nbytes))

    def synchronize(self) -> None:
        pass


INPUT, OUTPUT = "INPUT", "OUTPUT"
fake_trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT), nptype=lambda dtype: dtype)


class FakeEngine:
    def __init__(self, onnx_path: Path, spec: dict, device: FakeDevice, *, narrow: bool = False, profile=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.device = device
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
        self.io = {}
        for arg, mode in [(a, INPUT) for a in self.session.get_inputs()] + [(a, OUTPUT) for a in self.session.get_outputs()]:
            dtype = np.dtype(types[arg.type])
            self.io[arg.name] = (mode, np.dtype(np.int32) if narrow and dtype == np.int64 else dtype)
        self.names = list(self.io)
        self.profile = profile or decoder_profile(spec)
        self.runs: list[dict] = []

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return [list(s) for s in self.profile[name]]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        shape = tuple(shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        e, dev = self.engine, self.engine.device
        feeds = {}
        for name, (mode, dtype) in e.io.items():
            if mode != INPUT:
                continue
            shape = self.shapes[name]
            n = int(np.prod(shape)) * dtype.itemsize
            value = np.frombuffer(dev.view(self.addresses[name], n).tobytes(), dtype).reshape(shape)
            feeds[name] = value.astype(np.int64) if dtype == np.int32 else value
        outputs = [o.name for o in e.session.get_outputs()]
        results = e.session.run(outputs, feeds)
        for name, value in zip(outputs, results):
            data = np.ascontiguousarray(value, e.io[name][1])
            dev.view(self.addresses[name], data.nbytes)[:] = data.view(np.uint8).reshape(-1)
        e.runs.append({"shapes": dict(self.shapes), "addresses": dict(self.addresses)})
        return True


class FakeTrtBackend:
    """Stands in for ``trt_backend.TrtBackend`` (vision and text encoder engines): runs the graph the engine was
    built from (``<bundle>/<onnx>`` found through the manifest) and narrows INT64 outputs like TensorRT 8.x."""

    name = "tensorrt"
    opened: list[str] = []

    def __init__(self, engine_path: Path, meta: dict):
        import json

        from vlmprune.runtime.backends import OrtBackend

        bundle = engine_path.parents[2]
        manifest = json.loads((bundle / "manifest.json").read_text())
        job = engine_path.stem
        files = {b["name"]: b["file"] for b in manifest["vision"]["buckets"]}
        if manifest.get("text_encoder"):
            files["text_encoder"] = manifest["text_encoder"]["file"]
        self.inner = OrtBackend(bundle / files[job], "cpu")
        self.inputs, self.outputs = self.inner.inputs, self.inner.outputs
        FakeTrtBackend.opened.append(job)

    def run(self, feeds, outputs=None):
        out = self.inner.run(feeds, outputs)
        return {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in out.items()}


# --- shared by the issue 16 tests --------------------------------------------------------------------------------------

PROMPT = "What is next to the red house?"
FAKE_TRTEXEC = """#!/bin/sh
for a in "$@"; do case "$a" in --saveEngine=*) printf 'engine' > "${a#--saveEngine=}";; esac; done
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec"
echo "[I] TensorRT version: 10.3.0"
echo "[I] Selected Device: Orin"
echo "[I] Compute Capability: 8.7"
"""
ORIN = GpuInfo(True, "jetson", "NVIDIA Jetson AGX Orin Developer Kit", ["/etc/nv_tegra_release"])
ALL_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def env(gpu=None, providers=("CPUExecutionProvider",), tensorrt=False) -> Environment:
    """A machine to plan for: its GPU, ONNX Runtime's providers, whether TensorRT is importable."""
    return Environment(list(providers), tensorrt, gpu or GpuInfo(False))


def engine_bundle(root: Path) -> Path:
    """A GridPrune bundle (it has a text encoder; the fused decoder too where onnxruntime-genai is installed) with
    engines for every graph, recorded by prune-build itself: a stand-in trtexec writes the engine files."""
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps
    from vlmprune.export.trt_build import main as build_main

    path = export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=root / "b", validate=False),
                         Steps(quiet=True)).path
    trtexec = root / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC)
    trtexec.chmod(0o755)
    assert build_main.run([str(path), "--target", "trt10", "--precision", "fp16", "--decoder",
                           "--trtexec", str(trtexec)]) == 0
    return path
