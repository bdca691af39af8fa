"""TensorRT targets and what each needs of an ONNX graph (``specs/tensorrt.md``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmprune.errors import VlmpruneError


@dataclass(frozen=True)
class Target:
    name: str
    trt_version: tuple[int, int]
    opset: int  # the opset vlmprune exports for it
    max_opset: int  # the newest opset its parser reads correctly
    max_ir: int
    layernorm_op: bool  # has a LayerNormalization importer
    native_int64: bool
    cumsum_loop: bool  # CumSum runs as a sequential loop
    topk_max_k: int = 3840  # K must be < this
    jetpack: str = ""


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        # JetPack 5.1 (L4T r35) has this TensorRT but Python 3.8, which vlmprune does not run on: x86 TensorRT 8.5
        Target("trt8.5", (8, 5), 16, 17, 8, False, False, True),
        Target("trt8.6", (8, 6), 17, 17, 8, True, False, True, jetpack="JetPack 6.0"),
        Target("trt10", (10, 3), 17, 20, 10, True, True, True, jetpack="JetPack 6.1/6.2"),
        Target("trt11", (11, 0), 17, 22, 10, True, True, False),
    ]
}
DEFAULT_TARGET = "trt10"


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise VlmpruneError(f"unknown TensorRT target {name!r}", f"choose one of: {', '.join(TARGETS)}") from None


_BANNER = re.compile(r"\[TensorRT v(\d+)\]")


def parse_trt_version(text: str) -> tuple[int, int, int] | None:
    """``"10.3.0.26"`` (``tensorrt.__version__``) or trtexec's banner ``[TensorRT v100300]`` / ``[TensorRT v8502]``
    (``NV_TENSORRT_VERSION``: major * 1000 + minor * 100 + patch before 10, major * 10000 + minor * 100 + patch from
    10 on, NvInferVersion.h) as (major, minor, patch)."""
    m = _BANNER.search(text)
    if m:
        n = int(m.group(1))
        if n >= 100000:
            return n // 10000, n // 100 % 100, n % 100
        return n // 1000, n // 100 % 10, n % 100
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def target_for(version: tuple[int, ...]) -> Target | None:
    """The target a TensorRT version builds: 8.5 and 8.6 exactly, any 10.x or 11.x by major version."""
    for t in TARGETS.values():
        if t.trt_version[0] >= 10 and t.trt_version[0] == version[0] or tuple(version[:2]) == t.trt_version:
            return t
    return None


def check_target(target: Target, version: tuple[int, ...], where: str) -> None:
    """A build for ``target`` on this TensorRT, or one line saying which target this TensorRT builds: the trtexec
    options and the Python API differ per version (8.5 has no --skipInference, 10.x no --buildOnly, 11 no
    BuilderFlag.FP16)."""
    here = target_for(version)
    if here is target:
        return
    found = ".".join(map(str, version))
    fix = (f"build with --target {here.name} (and export with --target {here.name} if the lint says so)" if here
           else f"install one of the TensorRT versions vlmprune targets ({', '.join(TARGETS)})")
    raise VlmpruneError(f"--target {target.name} needs TensorRT {'.'.join(map(str, target.trt_version))}"
                        f"{'.x' if target.trt_version[0] >= 10 else ''}; {where} is TensorRT {found}", fix)
