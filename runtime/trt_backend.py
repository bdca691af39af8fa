"""The TensorRT engine backend, same interface as the ONNX Runtime one; refuses engines from another TensorRT
version or GPU. I/O dtypes are read from the engine (8.x narrows INT64 to INT32), never assumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError

from .backends import Backend


def current_device() -> dict:
    """Name and compute capability of GPU 0, through cuda-python (12 or 13: ``cuda_rt``)."""
    from .cuda_rt import device_properties

    props = device_properties(0)
    return {"gpu": props["gpu"], "compute_capability": props["compute_capability"]}


def check_engine_compat(meta: dict, trt_version: str, gpu: str, compute_capability: str, engine_name: str = "engine") -> None:
    """Engines are tied to the TensorRT version and the GPU they were built on: say so, in one line, before the
    deserializer fails obscurely."""
    built = ".".join(str(meta.get("trt_version", "?")).split(".")[:3])
    here = ".".join(trt_version.split(".")[:3])
    if built != here:
        raise VlmpruneError(
            f"{engine_name} was built with TensorRT {built}; this machine has TensorRT {here}",
            "rebuild it here with `prune-build` (engines are not portable across TensorRT versions)",
        )
    if meta.get("compute_capability") != compute_capability or meta.get("gpu") != gpu:
        raise VlmpruneError(
            f"{engine_name} was built for {meta.get('gpu')} (compute {meta.get('compute_capability')}); "
            f"this machine has {gpu} (compute {compute_capability})",
            "rebuild it on this device with `prune-build`",
        )


class TrtBackend(Backend):  # pragma: no cover - needs TensorRT and a GPU
    """Runs one engine through Polygraphy's TrtRunner (device buffers and streams handled by Polygraphy)."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, meta: dict):
        try:
            import tensorrt as trt
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            from .gpu import trt_install_fix

            raise VlmpruneError("TensorRT is not installed here", f"{trt_install_fix()}, or use ONNX Runtime") from None
        check_engine_compat(meta, trt.__version__, **current_device(), engine_name=engine_path.name)
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()
        engine = self.runner.engine
        self.inputs, self.outputs = {}, []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = dtype
            else:
                self.outputs.append(name)

    def run(self, feeds, outputs=None):
        result = self.runner.infer(self.cast_feeds(feeds), copy_outputs_to_host=True)
        names = outputs or self.outputs
        # INT32 outputs of 8.x engines (kept_indices) are widened back to the manifest's INT64
        return {n: (result[n].astype(np.int64) if result[n].dtype == np.int32 else result[n]) for n in names}

    def close(self):
        self.runner.deactivate()
