"""cuda-python's CUDA runtime module, wherever this cuda-python keeps it.

- cuda-python 12.6 and later, and 13: ``cuda.bindings.runtime`` (the bindings moved to the ``cuda-bindings``
  package; 13 removed the old ``cuda.cudart`` trampoline);
- cuda-python 12.0-12.5: ``cuda.cudart`` only.
The new path is tried first, so a 12.6+ install never goes through the deprecated one.
"""

from __future__ import annotations

import importlib

from vlmprune.errors import VlmpruneError

MODULES = ("cuda.bindings.runtime", "cuda.cudart")


def cudart():
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise VlmpruneError("cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart imports)",
                        "pip install 'cuda-python>=12,<13' (CUDA 12 drivers, JetPack 6); cuda-python 13 needs a "
                        "CUDA 13 driver")


def device_properties(index: int = 0) -> dict:
    """Name, compute capability and total memory of GPU ``index``; one line when there is none."""
    rt = cudart()
    err, props = rt.cudaGetDeviceProperties(index)
    if int(err) != 0:
        raise VlmpruneError(f"no CUDA device is available (cudaGetDeviceProperties: error {int(err)})",
                            "TensorRT engines need an NVIDIA GPU and a driver matching cuda-python's CUDA major version")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
            "total_memory": int(props.totalGlobalMem)}
