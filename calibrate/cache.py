"""INT8 calibration caches for implicit quantisation (TensorRT 8.5/8.6 and 10.3 on JetPack), through Polygraphy's
calibrator. Needs TensorRT and a GPU: on a machine without them it says so and the Q/DQ path is the one to use."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def write_cache(onnx_path: Path, cache_path: Path, feeds: list[dict[str, np.ndarray]], algo: str,
                workspace_mib: int = 2048) -> None:  # pragma: no cover - needs TensorRT and a GPU
    import tensorrt as trt
    from polygraphy.backend.trt import Calibrator, CreateConfig, EngineFromNetwork, NetworkFromOnnxPath

    base = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator,
            "percentile": trt.IInt8LegacyCalibrator}[algo]
    calibrator = Calibrator(data_loader=feeds, cache=str(cache_path), BaseClass=base)
    config = CreateConfig(int8=True, fp16=True, calibrator=calibrator,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20})
    EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()  # building runs the calibration
