"""Static checks of ONNX graphs against the TensorRT rules of ``specs/tensorrt.md``, run on CPU.

Each finding has a level: ``error`` (the target will reject the graph or compute something else), ``warning``
(it builds but slowly or with a caveat), ``note`` (worth knowing, e.g. INT64 I/O narrowed on 8.x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx
from onnx import numpy_helper

from .onnx_io import opset_of
from .targets import TARGETS, Target

_NEVER = {
    "NonZero": "data-dependent shape",
    "Unique": "no TensorRT version supports it",
    "Loop": "control flow",
    "If": "control flow",
    "Einsum": "avoid: slow or unsupported patterns; use MatMul",
    "Scan": "control flow",
}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceProd",
           "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class Finding:
    level: str
    rule: str
    message: str
    node: str = ""


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # external data not loaded or an op without inference: dtype checks then stay silent
        inferred = model
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for t in inferred.graph.initializer:
        types[t.name] = t.data_type
    return types


def lint(model: onnx.ModelProto, target: Target) -> list[Finding]:
    out: list[Finding] = []
    opset = opset_of(model)
    if opset > target.max_opset:
        out.append(Finding("error", "opset", f"opset {opset} > {target.max_opset}, the newest {target.name} parses"))
    if target.trt_version < (9, 0) and opset >= 18:
        out.append(Finding("error", "opset", f"opset {opset}: Reduce* axes are inputs, which {target.name} ignores"))
    if model.ir_version > target.max_ir:
        out.append(Finding("error", "ir", f"IR version {model.ir_version} > {target.max_ir} for {target.name}"))
    consts = _constants(model)
    types = _elem_types(model)
    for node in model.graph.node:
        op, name = node.op_type, node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):  # e.g. ONNX Runtime's com.microsoft contrib ops (MatMulNBits)
            out.append(Finding("error", "custom-op", f"{node.domain}::{op} is not an ONNX standard op; TensorRT's "
                               "parser has no importer for it", name))
        elif op in _NEVER:
            out.append(Finding("error", "forbidden-op", f"{op}: {_NEVER[op]}", name))
        elif op == "CumSum" and target.cumsum_loop:
            out.append(Finding("warning", "cumsum", "CumSum runs as a sequential loop before TensorRT 10.8", name))
        elif op in ("ScatterElements", "ScatterND") and any(
            a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute
        ):
            level = "error" if target.trt_version < (9, 0) else "warning"
            out.append(Finding(level, "scatter-reduction", f"{op} with a reduction (8.x ignores it)", name))
        elif op == "LayerNormalization" and not target.layernorm_op:
            out.append(Finding("error", "layernorm", f"{target.name} has no LayerNormalization importer; export "
                               f"opset 16 so it stays decomposed", name))
        elif op == "TopK":
            out.extend(_lint_topk(node, name, consts, types, target))
        elif op in _REDUCE and len(node.input) > 1 and node.input[1]:
            out.extend(_lint_reduce_axes(node, name, consts, target))
    if not target.native_int64:
        for vi in list(model.graph.input) + list(model.graph.output):
            if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
                out.append(Finding("note", "int64-io", f"{vi.name} is INT64; {target.name} narrows it to INT32 "
                                   "(read I/O dtypes from the engine)"))
    return out


def _lint_reduce_axes(node, name, consts, target: Target) -> list[Finding]:
    # ReduceSum has taken axes as an input since opset 13 and every target reads it when it is a constant; the other
    # Reduce ops moved axes to an input only at opset 18, which TensorRT 8.x ignores (reducing over every axis).
    if node.input[1] not in consts:
        return [Finding("error", "reduce-axes", f"{node.op_type}'s axes are computed, not a constant", name)]
    if node.op_type != "ReduceSum" and target.trt_version < (9, 0):
        return [Finding("error", "reduce-axes", f"{node.op_type} takes its axes as an input, ignored by {target.name}",
                        name)]
    return []


def _lint_topk(node, name, consts, types, target: Target) -> list[Finding]:
    found = []
    k_name = node.input[1] if len(node.input) > 1 else ""
    if k_name not in consts:
        found.append(Finding("error", "topk-k", "TopK's K is computed, not a constant (8.5 rejects it)", name))
    else:
        k = int(numpy_helper.to_array(consts[k_name]).reshape(-1)[0])
        if k >= target.topk_max_k:
            found.append(Finding("error", "topk-k", f"TopK K={k} >= {target.topk_max_k}; use a chunked top-k", name))
    elem = types.get(node.input[0])
    if elem is not None and elem not in _FLOATS:
        found.append(Finding("error", "topk-int", "TopK on a non-float input (8.5 rejects integer TopK)", name))
    return found


def lint_all_targets(model: onnx.ModelProto, targets=None) -> dict[str, dict]:
    """``{target: {"ok": bool, "errors": n, "warnings": n, "findings": [...]}}`` for the manifest."""
    result = {}
    for tname in targets or TARGETS:
        findings = lint(model, TARGETS[tname])
        result[tname] = {
            "ok": not any(f.level == "error" for f in findings),
            "errors": sum(f.level == "error" for f in findings),
            "warnings": sum(f.level == "warning" for f in findings),
            "findings": [asdict(f) for f in findings],
        }
    return result
