"""TensorRT targets and what each needs of an ONNX graph (``specs/tensorrt.md``)."""

from __future__ import annotations

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
        Target("trt8.5", (8, 5), 16, 17, 8, False, False, True, jetpack="JetPack 5.1"),
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
