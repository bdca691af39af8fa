"""``prune-doctor [BUNDLE]``: what this machine offers a vlmprune bundle on the GPU, one line per finding with its fix.

The first command a device user runs. It works on the base install (no torch, no onnx, no TensorRT needed) and
changes nothing: it reads files (``/proc``, ``/etc/nv_tegra_release``), asks ``trtexec --help`` for its version
banner, and imports cuda-python only to read the device's properties.

Machine: GPU and compute capability, driver and its CUDA version, JetPack release, TensorRT (Python module),
trtexec, cuda-python, Polygraphy, ONNX Runtime and its providers. With a bundle, also: its graphs against the
installed TensorRT (the export's lint for that version), its engines' TensorRT version and GPU, its decoder's
precision against the ONNX Runtime providers present, and the memory it needs against the memory present.
Exit code 1 when the bundle cannot run on the GPU here (0 without a bundle; 2 for bad input).

It lives in ``export/`` because it reads the TensorRT target table (``targets.py``), which the runtime does not
import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmprune.cli_common import HelpFormatter, main_wrapper
from vlmprune.errors import VlmpruneError

from .targets import TARGETS, parse_trt_version, target_for

OK, WARN, MISSING, FAIL = "ok", "warn", "missing", "fail"
# L4T release -> JetPack (NVIDIA's JetPack archive): R36.4 is JetPack 6.1 (36.4.0) and 6.2 (36.4.3), R36.3 is 6.0,
# R35 is JetPack 5.x (Ubuntu 20.04, Python 3.8: not supported).
JETPACK = {(36, 4): "6.1/6.2", (36, 3): "6.0", (36, 2): "6.0 DP"}
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec",)  # JetPack and the NGC images put it there, off PATH


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | missing | fail
    found: str
    fix: str = ""

    def line(self) -> str:
        return f"[{self.status:>7}] {self.check}: {self.found}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass
class Machine:
    """What was found; ``None``: not found or not readable."""

    gpu: str | None = None
    gpu_kind: str = ""
    compute_capability: str | None = None
    gpu_memory: int | None = None  # bytes the GPU can use (Jetson: shared RAM)
    driver: str | None = None
    cuda_driver: tuple[int, int] | None = None
    jetpack: str | None = None
    l4t: tuple[int, int] | None = None
    tensorrt: str | None = None
    trtexec: str | None = None
    trtexec_version: tuple[int, int, int] | None = None
    cuda_python: str | None = None
    polygraphy: str | None = None
    ort_version: str = ""
    ort_providers: list[str] = field(default_factory=list)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _tensorrt_version() -> str | None:
    """The version of the ``tensorrt`` module, read without importing it where its metadata says (importing it
    loads CUDA); JetPack's system package has metadata too."""
    import importlib.util

    try:
        if importlib.util.find_spec("tensorrt") is None:
            return None
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return None
    version = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_bindings")
    if version:
        return version
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        return None


def _trtexec_version(exe: str, run) -> tuple[int, int, int] | None:
    try:
        done = run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_trt_version((done.stdout or "") + (done.stderr or ""))


def inspect_machine(root: str | Path = "/", which=shutil.which, run=subprocess.run, cuda=True) -> Machine:
    """``root``/``which``/``run``: the file system, PATH lookup and process runner to use (tests pass crafted ones);
    ``cuda``: read the device through cuda-python where it is installed."""
    from vlmprune.runtime.gpu import detect_gpu

    root = Path(root)
    m = Machine()
    gpu = detect_gpu(root, which)
    if gpu.present:
        m.gpu, m.gpu_kind = gpu.label(), gpu.kind
    nvrm = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", _read(root / "proc/driver/nvidia/version"))
    m.driver = nvrm.group(1) if nvrm else None
    tegra = re.search(r"R(\d+) \(release\), REVISION: (\d+)", _read(root / "etc/nv_tegra_release"))
    if tegra:
        m.l4t = (int(tegra.group(1)), int(tegra.group(2)))
        m.jetpack = JETPACK.get(m.l4t, "5.x" if m.l4t[0] == 35 else None)
    if gpu.kind == "jetson":  # integrated GPU: it uses the system RAM
        mem = re.search(r"MemTotal:\s+(\d+) kB", _read(root / "proc/meminfo"))
        m.gpu_memory = int(mem.group(1)) * 1024 if mem else None
    m.tensorrt = _tensorrt_version()
    m.cuda_python = _dist_version("cuda-python", "cuda-bindings")
    m.polygraphy = _dist_version("polygraphy")
    exe = which("trtexec") or next((p for p in TRTEXEC_PATHS if os.access(root / p.lstrip("/"), os.X_OK)), None)
    if exe:
        m.trtexec, m.trtexec_version = exe, _trtexec_version(exe, run)
    import onnxruntime as ort

    m.ort_version, m.ort_providers = ort.__version__, list(ort.get_available_providers())
    if cuda and gpu.present and m.cuda_python:
        _read_device(m)
    return m


def _read_device(m: Machine) -> None:  # pragma: no cover - needs a GPU
    try:
        from vlmprune.runtime.cuda_rt import cudart, device_properties

        props = device_properties(0)
        m.gpu, m.compute_capability = props["gpu"], props["compute_capability"]
        if m.gpu_kind != "jetson":
            m.gpu_memory = props["total_memory"]
        err, version = cudart().cudaDriverGetVersion()
        if int(err) == 0:
            m.cuda_driver = (int(version) // 1000, int(version) % 1000 // 10)
    except Exception:
        pass  # the findings say what is unknown


# --- findings ---------------------------------------------------------------------------------------------------------


def machine_findings(m: Machine) -> list[Finding]:
    from vlmprune.runtime.gpu import GpuInfo, ort_gpu_fix, trt_install_fix

    gpu_info = GpuInfo(m.gpu is not None, m.gpu_kind, m.gpu or "")
    out = []
    if m.gpu is None:
        out.append(Finding("GPU", MISSING, "no NVIDIA GPU is visible (no driver files, device nodes or nvidia-smi)",
                           "run on a machine with an NVIDIA GPU; in a container pass --gpus all (x86) or "
                           "--runtime nvidia (Jetson)"))
    else:
        cc = f", compute capability {m.compute_capability}" if m.compute_capability else ""
        out.append(Finding("GPU", OK, f"{m.gpu}{cc}"))
    if m.gpu_kind == "jetson":
        if m.jetpack == "5.x":
            out.append(Finding("JetPack", FAIL, f"L4T R{m.l4t[0]}.{m.l4t[1]} (JetPack 5.x: Ubuntu 20.04, Python 3.8)",
                               "flash JetPack 6.1 or 6.2: vlmprune needs Python >= 3.10"))
        else:
            l4t = f"L4T R{m.l4t[0]}.{m.l4t[1]}" if m.l4t else "L4T release unknown"
            out.append(Finding("JetPack", OK if m.jetpack else WARN, f"{m.jetpack or 'unknown'} ({l4t})"))
    elif m.gpu is not None:
        out.append(Finding("driver", OK if m.driver else WARN, m.driver or "version unknown (no /proc/driver/nvidia)"))
    if m.cuda_driver:
        out.append(Finding("CUDA (driver)", OK, ".".join(map(str, m.cuda_driver))))
    if m.tensorrt is None:
        out.append(Finding("TensorRT", MISSING, "the tensorrt Python module is not installed",
                           trt_install_fix(gpu_info)))
    else:
        out.append(Finding("TensorRT", OK, f"{m.tensorrt} (builds --target "
                                           f"{getattr(target_for(parse_trt_version(m.tensorrt) or (0,)), 'name', '?')})"))
    if m.trtexec is None:
        out.append(Finding("trtexec", MISSING, "not on PATH nor in /usr/src/tensorrt/bin",
                           "install TensorRT's binaries (JetPack: /usr/src/tensorrt/bin), or build with --via api"))
    else:
        version = ".".join(map(str, m.trtexec_version)) if m.trtexec_version else "unknown version"
        out.append(Finding("trtexec", OK if m.trtexec_version else WARN, f"{m.trtexec} (TensorRT {version})"))
    if m.cuda_python is None:
        out.append(Finding("cuda-python", MISSING, "not installed (TensorRT engines read the device through it)",
                           "pip install 'cuda-python>=12,<13'"))
    elif m.cuda_python.split(".")[0] == "13" and m.cuda_driver and m.cuda_driver[0] < 13:
        out.append(Finding("cuda-python", FAIL, f"{m.cuda_python} needs a CUDA 13 driver; this one is CUDA "
                                                f"{'.'.join(map(str, m.cuda_driver))}", "pip install 'cuda-python>=12,<13'"))
    else:
        out.append(Finding("cuda-python", OK, m.cuda_python))
    out.append(Finding("Polygraphy", OK, m.polygraphy) if m.polygraphy else
               Finding("Polygraphy", MISSING, "not installed (the TensorRT backend runs engines through it)",
                       "pip install 'polygraphy>=0.49'"))
    gpu_eps = [p for p in m.ort_providers if p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in m.ort_providers)
    if gpu_eps or m.gpu is None:
        out.append(Finding("ONNX Runtime", OK, f"{m.ort_version} ({providers})"))
    else:
        out.append(Finding("ONNX Runtime", WARN, f"{m.ort_version} has no GPU provider ({providers})",
                           ort_gpu_fix(gpu_info)))
    return out


def _size(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def bundle_memory(bundle) -> int:
    """Bytes the bundle needs resident at once: the vision weights, the largest decoder's weights, the embedding
    table and the KV cache at the full context."""
    folder, man = bundle.folder, bundle.manifest
    dec = man["decoder"]

    def size(rel):
        try:
            return (folder / rel).stat().st_size
        except (OSError, TypeError):
            return 0

    vision = sum({size(b.get("weights")) for b in man["vision"]["buckets"] if b.get("weights")} or {0})
    vision = vision or size("vision.weights")
    decoders = [size(dec.get("weights"))] + [size((man.get("decoder_fused") or {}).get("weights"))]
    embeds = size((dec.get("embeddings") or {}).get("file") if isinstance(dec.get("embeddings"), dict) else None)
    kv_bytes = {"float16": 2, "bfloat16": 2, "float32": 4}.get(str(dec.get("kv_dtype")), 4)
    kv = 2 * dec["num_layers"] * dec["num_kv_heads"] * dec["head_dim"] * dec["max_context"] * kv_bytes
    return vision + max(decoders) + embeds + kv


def bundle_findings(bundle, m: Machine) -> tuple[list[Finding], bool]:
    """Findings about ``bundle`` on this machine, and whether it can run on the GPU here."""
    from vlmprune.runtime.gpu import matmulnbits_on_cuda, trt_install_fix

    man, out = bundle.manifest, []
    can_gpu = m.gpu is not None and m.jetpack != "5.x"
    version = parse_trt_version(m.tensorrt or "") or m.trtexec_version
    here = target_for(version) if version else None
    exported = man.get("target")
    if here is None:
        out.append(Finding("bundle target", WARN if version is None else FAIL,
                           f"exported for {exported}; " + ("no TensorRT here to build engines" if version is None
                                                           else f"TensorRT {'.'.join(map(str, version))} is not a "
                                                                "version vlmprune targets"),
                           trt_install_fix() if version is None else f"install one of {', '.join(TARGETS)}"))
    else:
        failing = sorted(g for g, per in (man.get("lint") or {}).items() if not (per.get(here.name) or {"ok": True})["ok"])
        if failing:
            out.append(Finding("bundle target", FAIL, f"exported for {exported}; {failing[0]} fails the {here.name} "
                                                      f"lint, which this TensorRT needs",
                               f"re-export with `prune-export --target {here.name}`"))
        else:
            out.append(Finding("bundle target", OK, f"exported for {exported}; its graphs pass the {here.name} lint "
                                                    "this TensorRT needs"))
    names = bundle.engine_names()
    if not names:
        out.append(Finding("engines", WARN, "none built",
                           f"build them here: prune-build {bundle.folder} --target {here.name if here else 'trt10'}"))
    for name in names:
        try:
            meta = bundle.engines(name).meta
        except VlmpruneError as exc:
            out.append(Finding(f"engines {name}", FAIL, str(exc), exc.fix))
            continue
        built = str(meta.get("trt_version", "?"))
        same_trt = m.tensorrt is not None and built.split(".")[:3] == m.tensorrt.split(".")[:3] or (
            m.tensorrt is None and m.trtexec_version is not None
            and tuple(parse_trt_version(built) or ()) == m.trtexec_version)
        same_gpu = m.compute_capability is None or meta.get("compute_capability") == m.compute_capability
        if same_trt and same_gpu:
            out.append(Finding(f"engines {name}", OK, f"TensorRT {built}, {meta.get('gpu')}"))
        else:
            why = (f"built with TensorRT {built} for {meta.get('gpu')} (compute {meta.get('compute_capability')}); "
                   f"this machine has TensorRT {m.tensorrt or '.'.join(map(str, m.trtexec_version or ())) or 'none'}")
            out.append(Finding(f"engines {name}", FAIL, why, f"rebuild them here with `prune-build {bundle.folder}`"))
    dec = man["decoder"]
    bits = (dec.get("quantization") or {}).get("bits")
    cuda = "CUDAExecutionProvider" in m.ort_providers
    if bits:
        if not cuda:
            out.append(Finding("decoder", FAIL if m.gpu else WARN, f"int{bits} MatMulNBits needs ONNX Runtime's CUDA "
                                                                   "provider, which this ONNX Runtime lacks",
                               "install onnxruntime-gpu (prune-run says which build)"))
            can_gpu = False
        elif not matmulnbits_on_cuda(bits, m.ort_version):
            out.append(Finding("decoder", FAIL, f"int{bits} MatMulNBits has a CUDA kernel from ONNX Runtime 1.22 on; "
                                                f"this is {m.ort_version}, so the decoder would run on the CPU",
                               "pip install 'onnxruntime-gpu>=1.22' (Jetson: from the Jetson AI Lab index)"))
            can_gpu = False
        else:
            out.append(Finding("decoder", OK, f"int{bits} MatMulNBits on ONNX Runtime {m.ort_version} (CUDA)"))
    else:
        has_engine = any("decoder" in (bundle.engines(n).meta.get("files") or {}) for n in names
                         if _safe_meta(bundle, n))
        if has_engine or cuda:
            out.append(Finding("decoder", OK, f"{dec.get('precision', 'fp32')} on "
                                              f"{'its TensorRT engine' if has_engine else 'ONNX Runtime CUDA'}"))
        else:
            out.append(Finding("decoder", FAIL if m.gpu else WARN,
                               f"{dec.get('precision', 'fp32')}: no decoder engine and no CUDA provider here",
                               f"prune-build {bundle.folder} --decoder, or install onnxruntime-gpu"))
            can_gpu = False
    need = bundle_memory(bundle)
    if m.gpu_memory is None:
        out.append(Finding("memory", WARN, f"the bundle needs at least {_size(need)}; the GPU's memory is unknown here",
                           "" if m.gpu is None else "install cuda-python to read it"))
    elif need > m.gpu_memory:
        out.append(Finding("memory", FAIL, f"the bundle needs at least {_size(need)}; the GPU has {_size(m.gpu_memory)}",
                           "export with --decoder-precision int4 or a shorter --max-context"))
        can_gpu = False
    else:
        out.append(Finding("memory", OK, f"the bundle needs at least {_size(need)} of {_size(m.gpu_memory)}"))
    can_gpu = can_gpu and not any(f.status == FAIL for f in out)
    return out, can_gpu


def _safe_meta(bundle, name) -> bool:
    try:
        bundle.engines(name)
    except VlmpruneError:
        return False
    return True


def _parser():
    p = argparse.ArgumentParser(
        prog="prune-doctor", formatter_class=HelpFormatter,
        description="What this machine offers vlmprune on the GPU (GPU, driver, JetPack, TensorRT, trtexec, "
                    "cuda-python, Polygraphy, ONNX Runtime), and with BUNDLE whether that bundle can run on it. One "
                    "line per finding with its fix; exit 1 when the bundle cannot run on the GPU here.")
    p.add_argument("bundle", nargs="?", type=Path, help="bundle folder written by prune-export (optional)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    return p


def report(bundle_path: Path | None, machine: Machine) -> dict:
    from vlmprune.bundle import Bundle

    findings = machine_findings(machine)
    gpu_ready = None
    if bundle_path is not None:
        more, gpu_ready = bundle_findings(Bundle.open(bundle_path), machine)
        findings += more
    return {"machine": asdict(machine), "findings": [asdict(f) for f in findings], "bundle": str(bundle_path or ""),
            "gpu_ready": gpu_ready}


@main_wrapper("prune-doctor")
def main(argv=None):
    args = _parser().parse_args(argv)
    result = report(args.bundle, inspect_machine())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for f in result["findings"]:
            print(Finding(**f).line())
        if result["gpu_ready"] is not None:
            print(f"bundle {args.bundle}: " + ("can run on the GPU here" if result["gpu_ready"]
                                                else "cannot run on the GPU here (see the lines above)"))
    return 1 if result["gpu_ready"] is False else 0
