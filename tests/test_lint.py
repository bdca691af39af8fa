"""The TensorRT lint on small hand-made graphs: each rule fires on what it should and stays quiet otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmprune.export.lint import lint
from vlmprune.export.targets import TARGETS, get_target
from vlmprune.errors import VlmpruneError


def graph(nodes, inputs, outputs, initializers=(), opset=17, ir=8):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def fvi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def rules(model, target):
    return {(f.level, f.rule) for f in lint(model, TARGETS[target])}


def topk_model(k=16, dtype=TensorProto.FLOAT, computed=False):
    nodes = []
    inits = []
    if computed:
        nodes.append(helper.make_node("Shape", ["x"], ["shape"]))
        nodes.append(helper.make_node("Gather", ["shape", "one"], ["k"], axis=0))
        inits.append(const("one", [1]))
    else:
        inits.append(const("k", [k]))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1))
    return graph(nodes, [fvi("x", [1, 5000], dtype)], [fvi("v", None, dtype), fvi("i", None, TensorProto.INT64)], inits)


def test_clean_topk_passes_everywhere():
    for target in TARGETS:
        assert not any(level == "error" for level, _ in rules(topk_model(), target))


def test_topk_rules():
    assert ("error", "topk-k") in rules(topk_model(computed=True), "trt10")
    assert ("error", "topk-k") in rules(topk_model(k=3840), "trt10")
    assert ("error", "topk-k") not in rules(topk_model(k=3839), "trt10")
    assert ("error", "topk-int") in rules(topk_model(dtype=TensorProto.INT64), "trt8.5")


def test_forbidden_ops():
    for op in ("NonZero", "Loop", "If", "Unique", "Einsum"):
        node = helper.make_node(op, ["x"], ["y"])
        m = graph([node], [fvi("x", [4])], [fvi("y", None)])
        assert ("error", "forbidden-op") in rules(m, "trt10"), op


def test_cumsum_warns_before_10_8():
    m = graph([helper.make_node("CumSum", ["x", "ax"], ["y"])], [fvi("x", [4])], [fvi("y", [4])], [const("ax", 0)])
    assert ("warning", "cumsum") in rules(m, "trt10")
    assert ("warning", "cumsum") not in rules(m, "trt11")


def test_scatter_with_reduction():
    node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], reduction="add")
    m = graph([node], [fvi("x", [4]), fvi("i", [2], TensorProto.INT64), fvi("u", [2])], [fvi("y", [4])])
    assert ("error", "scatter-reduction") in rules(m, "trt8.6")


def test_reduce_axes_as_input_on_opset_18():
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"])
    m = graph([node], [fvi("x", [2, 4])], [fvi("y", None)], [const("axes", [1])], opset=18)
    found = rules(m, "trt8.6")
    assert ("error", "opset") in found and ("error", "reduce-axes") in found
    assert ("error", "reduce-axes") not in rules(m, "trt10")


def test_reducesum_with_constant_axes_is_fine_and_computed_axes_are_not():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"])
    ok = graph([node], [fvi("x", [2, 4])], [fvi("y", None)], [const("axes", [1])], opset=13)
    assert not rules(ok, "trt8.5")
    bad = graph([node], [fvi("x", [2, 4]), fvi("axes", [1], TensorProto.INT64)], [fvi("y", None)], opset=13)
    assert ("error", "reduce-axes") in rules(bad, "trt10")


def test_layernorm_needs_opset_16_for_trt85():
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)
    inits = [const("s", [1.0] * 4, np.float32), const("b", [0.0] * 4, np.float32)]
    m = graph([node], [fvi("x", [2, 4])], [fvi("y", [2, 4])], inits)
    assert ("error", "layernorm") in rules(m, "trt8.5")
    assert ("error", "layernorm") not in rules(m, "trt8.6")


def test_ir_and_int64_io_notes():
    m = topk_model()
    m.ir_version = 10
    assert ("error", "ir") in rules(m, "trt8.6")
    assert ("note", "int64-io") in rules(topk_model(), "trt8.5")
    assert ("note", "int64-io") not in rules(topk_model(), "trt10")


def test_unknown_target():
    with pytest.raises(VlmpruneError, match="unknown TensorRT target 'trt7'"):
        get_target("trt7")
