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


# --- issue 21: a stricter TensorRT, per version ------------------------------------------------------------------------
#
# Each emulated rule is what the real TensorRT does, from its sources (NVIDIA/TensorRT at the tag named):
# - trtexec's options: every "--name" literal of samples/common/sampleOptions.cpp at 8.5.3, v8.6.1, v10.3.0, v10.13.0
#   and v11.1 (the safety builder's and task-inference parsers left out: trtexec does not call them), kept as data in
#   fixtures/trtexec_options.json; an option left over is "Unknown option: ..." and a failed run
#   (samples/trtexec/trtexec.cpp 8.5.3:150, v11.1:378);
# - the banner "[TensorRT vNNNN]" printed before any option is parsed (trtexec.cpp v10.3.0:219, logging.h 8.5.3:383);
# - --layerPrecisions on a layer computing no float, and --layerOutputTypes on a non-float output, fail the build
#   (NvInfer.h v10.3.0:724 "cannot be used to set the data type of the second output tensor of the TopK layer";
#   network validation rejects fp32 on boolean layers, TensorRT issues 1516 and 3570);
# - --int8 with neither --calib nor Q/DQ nodes calibrates on random data (RndInt8Calibrator, an
#   IInt8EntropyCalibrator2: samples/common/sampleEngines.cpp v10.3.0:295 and :1075): refused here, since the
#   engine would be garbage;
# - Python: IInt8*Calibrator classes up to 10.x (python/src/infer/pyInt8.cpp), none in 11.1; BuilderFlag.FP16/INT8/
#   OBEY_PRECISION_CONSTRAINTS up to 10.x (pyCore.cpp v10.3.0:1338-1348), none in 11.1; EXPLICIT_BATCH up to 10.x,
#   STRONGLY_TYPED from 10.0 (pyCore.cpp v10.3.0:1502-1504, v11.1:1773).

import json as _json
import sys as _sys
import types as _types

OPTIONS = _json.loads((Path(__file__).parent / "fixtures" / "trtexec_options.json").read_text())
VERSIONS = {"8.5": "8.5.2", "8.6": "8.6.2", "10.3": "10.3.0", "10.13": "10.13.0", "11.1": "11.1.0"}


def options_for(version: str) -> set[str]:
    """trtexec's options at ``version`` ("10.3.0"): the table of the nearest listed release at or below it."""
    major, minor = (int(x) for x in version.split(".")[:2])
    keys = [k for k in OPTIONS if tuple(map(int, k.split("."))) <= (major, minor)
            and int(k.split(".")[0]) == major]
    if not keys:
        raise KeyError(f"no trtexec option table for TensorRT {version}")
    return set(OPTIONS[max(keys, key=lambda k: tuple(map(int, k.split("."))))]["options"])


def banner(version: str) -> str:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    n = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    return f"&&&& RUNNING TensorRT.trtexec [TensorRT v{n}] # trtexec"


STRICT_TRTEXEC = r'''#!{python}
"""An emulated trtexec {version}: refuses what the real one refuses (see tests/fake_trt.py)."""
import sys
options = set({options!r})
print({banner!r})
args = sys.argv[1:]
if "--help" in args:
    print("=== Model Options ===")
    sys.exit(0)
given = {{}}
for a in args:
    name, _, value = a.partition("=")
    if name not in options:
        print("[E] Unknown option: " + name + " " + value)
        print("&&&& FAILED TensorRT.trtexec")
        sys.exit(1)
    given[name] = value
float_types = {{1, 10, 11, 16}}
if "--onnx" in given:
    import onnx
    from onnx import shape_inference
    model = shape_inference.infer_shapes(onnx.load(given["--onnx"], load_external_data=False))
    g = model.graph
    types = {{v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) + list(g.input)}}
    nodes = {{n.name: n for n in g.node}}
    def fail(msg):
        print("[E] " + msg)
        print("&&&& FAILED TensorRT.trtexec")
        sys.exit(1)
    for flag in ("--layerPrecisions", "--layerOutputTypes"):
        for item in filter(None, given.get(flag, "").split(",")):
            layer, _, kind = item.rpartition(":")
            node = nodes.get(layer)
            if node is None:
                continue  # trtexec warns about names it does not find
            outs = [types.get(o) for o in node.output if o]
            if flag == "--layerPrecisions" and not (outs and outs[0] in float_types):
                fail(f"{{layer}} ({{node.op_type}}) computes no float: precision {{kind}} rejected by network validation")
            if flag == "--layerOutputTypes" and any(t not in float_types for t in outs):
                fail(f"{{layer}} ({{node.op_type}}): setOutputType cannot be used on a non-float output")
    qdq = any(n.op_type == "QuantizeLinear" for n in g.node)
    if "--int8" in given and "--calib" not in given and not qdq:
        fail("--int8 without --calib or Q/DQ nodes: calibration on random data (a garbage engine)")
    if "--stronglyTyped" in given and any(f in given for f in ("--fp16", "--int8", "--best")):
        fail("--stronglyTyped with precision flags")
if "--saveEngine" in given:
    open(given["--saveEngine"], "wb").write(b"engine")
print("[I] TensorRT version: {version}")
print("[I] Selected Device: Orin")
print("[I] Compute Capability: 8.7")
print("&&&& PASSED TensorRT.trtexec")
'''


def strict_trtexec(folder: Path, version: str = "10.3.0") -> Path:
    """A trtexec for TensorRT ``version`` in ``folder`` (run by this interpreter); returns its path."""
    path = Path(folder) / f"trtexec-{version}"
    path.write_text(STRICT_TRTEXEC.format(python=_sys.executable, version=version,
                                          options=sorted(options_for(version)), banner=banner(version)))
    path.chmod(0o755)
    return path


def fake_tensorrt(version: str) -> _types.ModuleType:
    """The ``tensorrt`` module's names that vlmprune uses, as ``version`` has them."""
    major = int(version.split(".")[0])
    trt = _types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32 = "float32"
    flags = ["TF32", "FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = _types.SimpleNamespace(**{f: f for f in (flags if major < 11 else ["TF32"])})
    creation = (["EXPLICIT_BATCH"] if major < 11 else []) + (["STRONGLY_TYPED"] if major >= 10 else [])
    trt.NetworkDefinitionCreationFlag = _types.SimpleNamespace(**{f: i for i, f in enumerate(creation)})
    trt.MemoryPoolType = _types.SimpleNamespace(WORKSPACE="WORKSPACE")
    if major < 11:
        for cls in ("IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                    "IInt8LegacyCalibrator"):
            setattr(trt, cls, type(cls, (), {}))
    return trt


class _Props:
    def __init__(self, name=b"Orin", major=8, minor=7, memory=64 << 30):
        self.name, self.major, self.minor, self.totalGlobalMem = name, major, minor, memory


def fake_cuda_python(version: str, present: bool = True) -> dict[str, _types.ModuleType]:
    """``sys.modules`` entries for cuda-python ``version``: 12.0-12.5 have ``cuda.cudart`` only; 12.6+ both;
    13 ``cuda.bindings.runtime`` only (cuda-python 13.0 release notes: the ``cuda.cudart`` trampolines are removed).
    ``present=False``: the call reports no device (cudaErrorNoDevice, 100)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    runtime = _types.ModuleType("runtime")
    runtime.cudaGetDeviceProperties = lambda i: (0, _Props()) if present else (100, None)
    cuda = _types.ModuleType("cuda")
    cuda.__path__ = []
    mods = {"cuda": cuda}
    if (major, minor) >= (12, 6):
        bindings = _types.ModuleType("cuda.bindings")
        bindings.__path__ = []
        bindings.runtime = runtime
        cuda.bindings = bindings
        mods.update({"cuda.bindings": bindings, "cuda.bindings.runtime": runtime})
    if major < 13:
        cuda.cudart = runtime
        mods["cuda.cudart"] = runtime
    return mods


class _Layer:
    """A parsed ONNX node as TensorRT's ILayer: ``precision`` only on a layer computing a float (a TopK computes its
    float values), ``set_output_type`` only on float outputs (NvInfer.h v10.3.0:724, pyGraph.cpp v10.3.0:346-352)."""

    def __init__(self, name, op, types, log):
        self.name, self.op, self.types, self.log = name, op, types, log
        self.num_outputs = len(types)

    @property
    def precision(self):
        return None

    @precision.setter
    def precision(self, dtype):
        if not self.types or self.types[0] not in (1, 10, 11, 16):
            raise RuntimeError(f"{self.name} ({self.op}) computes no float: precision {dtype} fails network validation")
        self.log.append(("precision", self.name))

    def set_output_type(self, index, dtype):
        if self.types[index] not in (1, 10, 11, 16):
            raise RuntimeError(f"{self.name} ({self.op}) output {index} is not a float: setOutputType cannot be used")
        self.log.append(("output_type", self.name, index))


def fake_tensorrt_api(version: str, log: list) -> _types.ModuleType:
    """``fake_tensorrt(version)`` plus the builder API ``build_with_api`` drives, strict as above; ``log`` collects
    what was set (flags, pins, profiles)."""
    trt = fake_tensorrt(version)
    major = int(version.split(".")[0])

    class Network:
        def __init__(self, flags):
            self.flags, self.layers = flags, []
            if major >= 11 and flags & 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED == 0:
                raise RuntimeError("TensorRT 11 networks are strongly typed")

        num_layers = property(lambda self: len(self.layers))

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            from vlmprune.export.onnx_nodes import read_node_types

            self.network.layers = [_Layer(n, op, types, log) for n, op, types in read_node_types(Path(path))]
            return True

    class Config:
        int8_calibrator = None

        def set_memory_pool_limit(self, pool, size):
            log.append(("workspace", size))

        def set_flag(self, flag):
            log.append(("flag", flag))

        def clear_flag(self, flag):
            log.append(("clear", flag))

        def add_optimization_profile(self, profile):
            log.append(("profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            return SimpleNamespace(serialize=lambda: b"timing")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine"

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt
