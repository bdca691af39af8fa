"""Is there an NVIDIA GPU on this machine, and what can run on it? Detected cheaply: a few files and PATH lookups, no
CUDA initialisation, no subprocess (``prune-run`` does this on every start, also with ``--plan``).

Evidence, any of which counts:
- discrete GPUs: the driver's ``/proc/driver/nvidia/version``, ``/dev/nvidia0``, ``nvidia-smi`` on PATH;
- Jetson (integrated GPU, no nvidia-smi on JetPack 5): ``/etc/nv_tegra_release`` (L4T), ``/dev/nvhost-ctrl-gpu``
  or ``/dev/nvgpu/igpu0/ctrl``, and a device-tree model naming a Jetson.
A container started without the NVIDIA runtime sees none of these, and correctly reports no usable GPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Where the JetPack builds of onnxruntime-gpu come from (NVIDIA's Jetson AI Lab pip index; the same URL the Dockerfile
# defaults to). JetPack 6.1/6.2 ship CUDA 12.6; JetPack 6.0 (CUDA 12.2) uses .../jp6/cu122; JetPack 5 has no index
# there: the Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime) lists its wheels.
JETSON_ORT_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"


@dataclass
class GpuInfo:
    present: bool
    kind: str = ""  # "jetson" or "discrete"
    name: str = ""  # e.g. "NVIDIA Jetson AGX Orin Developer Kit", when a file says so
    evidence: list[str] = field(default_factory=list)

    def label(self) -> str:
        return self.name or ("Jetson GPU" if self.kind == "jetson" else "NVIDIA GPU")


def _read(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace").replace("\x00", " ").strip()
    except OSError:
        return ""


def detect_gpu(root: str | Path = "/", which=shutil.which) -> GpuInfo:
    """``root``: the file system to look at (tests point it at a crafted folder)."""
    root = Path(root)
    evidence = []
    jetson = False
    tegra = _read(root / "etc/nv_tegra_release", 256)
    if tegra:
        evidence.append("/etc/nv_tegra_release")
        jetson = True
    model = _read(root / "proc/device-tree/model", 256)
    if "jetson" in model.lower() or "orin" in model.lower():
        evidence.append("/proc/device-tree/model")
        jetson = True
    for dev in ("dev/nvhost-ctrl-gpu", "dev/nvgpu/igpu0/ctrl"):
        if os.path.exists(root / dev):
            evidence.append(f"/{dev}")
            jetson = True
    name = model if jetson and model else ""
    for rel in ("proc/driver/nvidia/version", "dev/nvidia0"):
        if os.path.exists(root / rel):
            evidence.append(f"/{rel}")
    if not jetson and not name:
        gpus = root / "proc/driver/nvidia/gpus"
        try:
            first = sorted(gpus.iterdir())[0] if gpus.is_dir() else None
        except OSError:
            first = None
        if first is not None:
            for line in _read(first / "information").splitlines():
                if line.startswith("Model:"):
                    name = line.split(":", 1)[1].strip()
    if which("nvidia-smi"):
        evidence.append("nvidia-smi")
    if not evidence:
        return GpuInfo(False)
    return GpuInfo(True, "jetson" if jetson else "discrete", name, evidence)


@dataclass
class Environment:
    """What this machine offers the runtime: ONNX Runtime's providers, whether the TensorRT Python module is
    importable, and the GPU. Tests build one by hand to plan for machines they are not."""

    ort_providers: list[str]
    tensorrt: bool
    gpu: GpuInfo
    ort_version: str = ""  # onnxruntime.__version__ ("" in hand-built environments: no version limit applied)

    @property
    def ort_has_gpu(self) -> bool:
        return any(p in self.ort_providers for p in GPU_PROVIDERS)


def detect_environment() -> Environment:
    import onnxruntime as ort

    # find_spec does not import: tensorrt's import initialises CUDA, which --plan must not need
    return Environment(list(ort.get_available_providers()), importlib.util.find_spec("tensorrt") is not None,
                       detect_gpu(), ort.__version__)


# 8-bit MatMulNBits has a CUDA kernel from ONNX Runtime 1.22 on (microsoft/onnxruntime PR 24509, "[Cuda] support 8
# bits in MatMulNBits", release 1.22.0); before it, a session with the CUDA provider fails to create.
MATMULNBITS_CUDA = {4: (1, 17), 8: (1, 22)}


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def matmulnbits_on_cuda(bits: int, ort_version: str) -> bool:
    """Whether this ONNX Runtime runs ``bits``-bit MatMulNBits on its CUDA provider ("" : assume it does)."""
    need = MATMULNBITS_CUDA.get(bits)
    return not ort_version or need is not None and version_tuple(ort_version)[:2] >= need


def ort_trt_cache_dir() -> Path:
    """Where ONNX Runtime's TensorRT provider keeps the engines it builds (without a cache it rebuilds them on every
    start): the user's vlmprune cache. The provider creates the folder."""
    root = os.environ.get("VLMPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmprune")
    return Path(root) / "ort-tensorrt"


def ort_gpu_fix(gpu: GpuInfo) -> str:
    """How to get an ONNX Runtime that runs on this GPU, in one clause."""
    if gpu.kind == "jetson":
        return (f"install the JetPack build of onnxruntime-gpu (pip install onnxruntime-gpu --index-url "
                f"{JETSON_ORT_INDEX}, or the vlmprune:jetson image)")
    return "pip uninstall onnxruntime && pip install onnxruntime-gpu (the CUDA 12 build on PyPI)"


def trt_install_fix(gpu: GpuInfo | None = None) -> str:
    """How to get the TensorRT Python module here, in one clause. On Jetson it comes with JetPack: PyPI's
    ``tensorrt`` sdist refuses to build on Tegra, so ``pip install vlmprune[trt]`` is the wrong advice there."""
    gpu = gpu or detect_gpu()
    if gpu.kind == "jetson":
        return ("on Jetson TensorRT comes with JetPack: sudo apt install python3-libnvinfer (or use the vlmprune:jetson "
                "image), then pip install polygraphy 'cuda-python>=12,<13'")
    return "pip install 'vlmprune[trt]' (an x86 machine with an NVIDIA driver)"
