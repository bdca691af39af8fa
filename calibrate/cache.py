"""INT8 calibration caches for implicit quantisation (TensorRT 8.5/8.6), through Polygraphy's calibrator.

Both readers of a cache use an entropy calibrator: trtexec's ``--calib`` (an ``IInt8EntropyCalibrator2``) and
Polygraphy's ``Calibrator``, whose default base class is ``IInt8EntropyCalibrator2``. A cache written by another
calibrator carries another header, which they reject, and trtexec then calibrates on random data. So caches are
written with ``IInt8EntropyCalibrator2`` only, and ``--algo minmax|percentile`` is refused where caches are written.
TensorRT 10.x builds the Q/DQ graphs (implicit quantisation is deprecated from 10.0), and 11 has no calibrators at
all: no cache is written there, and no engine is built to make one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError

CACHE_ALGO = "entropy"


def calibration_support() -> tuple[bool, str]:
    """(True, "") when this machine writes calibration caches; else (False, why not, as a clause)."""
    try:
        import tensorrt as trt
    except Exception:
        return False, "TensorRT is not installed here; TensorRT 10.x and 11 build the Q/DQ graphs"
    from vlmprune.export.targets import parse_trt_version
    from vlmprune.runtime.gpu import detect_gpu

    version = parse_trt_version(str(getattr(trt, "__version__", ""))) or (0, 0, 0)
    if version >= (10, 0, 0):
        return False, (f"TensorRT {'.'.join(map(str, version))} builds the Q/DQ graphs (calibration caches are for "
                       "TensorRT 8.x)")
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        return False, f"this TensorRT ({trt.__version__}) has no IInt8EntropyCalibrator2"
    if not detect_gpu().present:
        return False, "no NVIDIA GPU here (calibration builds an engine on the GPU)"
    return True, ""


def check_algo(algo: str) -> None:
    if algo != CACHE_ALGO:
        raise VlmpruneError(
            f"--algo {algo} cannot make TensorRT 8.x calibration caches: trtexec --calib and Polygraphy's Calibrator "
            "read only entropy (IInt8EntropyCalibrator2) caches",
            "use --algo entropy here, or calibrate with --algo " + algo + " for Q/DQ graphs on a machine without "
            "TensorRT 8.x")


def write_cache(onnx_path: Path, cache_path: Path, feeds: list[dict[str, np.ndarray]], algo: str,
                workspace_mib: int = 2048) -> None:  # pragma: no cover - needs TensorRT 8.x and a GPU
    import tensorrt as trt
    from polygraphy.backend.trt import Calibrator, CreateConfig, EngineFromNetwork, NetworkFromOnnxPath

    check_algo(algo)
    calibrator = Calibrator(data_loader=feeds, cache=str(cache_path), BaseClass=trt.IInt8EntropyCalibrator2)
    config = CreateConfig(int8=True, fp16=True, calibrator=calibrator,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20})
    EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()  # building runs the calibration
