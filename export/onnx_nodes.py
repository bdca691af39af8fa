"""The (name, op_type) of every top-level node of an ONNX file, read without the ``onnx`` package.

``prune-build`` pins layers to fp32 by node name, and it must run on the base (edge) install, which has no ``onnx``
(a Jetson building with trtexec needs only the names). ``onnx.load`` is used where it is installed; otherwise this
reads the protobuf wire format directly, which is small and stable: ModelProto.graph is field 7, GraphProto.node
field 1, NodeProto.name field 3 and op_type field 4 (onnx/onnx.proto). Bundle graphs keep their weights in external
files, so the .onnx files read here are small.
"""

from __future__ import annotations

from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.onnx_wire import fields as _fields
from vlmprune.onnx_wire import varint as _varint

_MODEL_GRAPH, _GRAPH_NODE, _NODE_NAME, _NODE_OP_TYPE = 7, 1, 3, 4
_NODE_OUTPUT = 2
_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 11, 12, 13  # ValueInfoProto: name 1, type 2
_TYPE_TENSOR, _TENSOR_ELEM_TYPE = 1, 1  # TypeProto.tensor_type, TypeProto.Tensor.elem_type (a varint)
# TensorProto.DataType: FLOAT 1, FLOAT16 10, DOUBLE 11, BFLOAT16 16 (onnx/onnx.proto)
FLOAT_TYPES = frozenset({1, 10, 11, 16})


def _varint_field(buf: memoryview, start: int, end: int, number: int) -> int | None:
    """The value of varint field ``number`` in buf[start:end] (None when absent)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            if key >> 3 == number:
                return value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return None


def _text(buf: memoryview, s: int, e: int) -> str:
    return bytes(buf[s:e]).decode("utf-8")


def read_node_types(path: Path) -> list[tuple[str, str, list[int | None]]]:
    """(name, op_type, the element type of each output) of each node of the main graph. The types come from the
    file's own ``value_info`` (the exporter stores every intermediate tensor's type there), read from the wire format
    so the base install gets the same answer as one with ``onnx``; None for an output the file gives no type for."""
    try:
        buf = memoryview(Path(path).read_bytes())
        raw, types = [], {}
        for field, (gs, ge) in _fields(buf, 0, len(buf)):
            if field != _MODEL_GRAPH:
                continue
            for gfield, (s0, e0) in _fields(buf, gs, ge):
                if gfield == _GRAPH_NODE:
                    name, op_type, outputs = "", "", []
                    for nfield, (s, e) in _fields(buf, s0, e0):
                        if nfield == _NODE_NAME:
                            name = _text(buf, s, e)
                        elif nfield == _NODE_OP_TYPE:
                            op_type = _text(buf, s, e)
                        elif nfield == _NODE_OUTPUT:
                            outputs.append(_text(buf, s, e))
                    raw.append((name, op_type, outputs))
                elif gfield in (_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
                    vname, elem = None, None
                    for vfield, (s, e) in _fields(buf, s0, e0):
                        if vfield == 1:
                            vname = _text(buf, s, e)
                        elif vfield == 2:
                            for tfield, (ts, te) in _fields(buf, s, e):
                                if tfield == _TYPE_TENSOR:
                                    elem = _varint_field(buf, ts, te, _TENSOR_ELEM_TYPE)
                    if vname is not None and elem:
                        types[vname] = elem
        return [(name, op, [types.get(o) for o in outs if o]) for name, op, outs in raw]
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise VlmpruneError(f"{path} is not a readable ONNX file ({exc})", "re-export the bundle") from None


def read_nodes(path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of each node of the main graph, in graph order."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        model = onnx.load(str(path), load_external_data=False)
        return [(n.name, n.op_type) for n in model.graph.node]
    try:
        buf = memoryview(Path(path).read_bytes())
        nodes = []
        for field, (gs, ge) in _fields(buf, 0, len(buf)):
            if field != _MODEL_GRAPH:
                continue
            for gfield, (ns, ne) in _fields(buf, gs, ge):
                if gfield != _GRAPH_NODE:
                    continue
                name = op_type = ""
                for nfield, (s, e) in _fields(buf, ns, ne):
                    if nfield == _NODE_NAME:
                        name = bytes(buf[s:e]).decode("utf-8")
                    elif nfield == _NODE_OP_TYPE:
                        op_type = bytes(buf[s:e]).decode("utf-8")
                nodes.append((name, op_type))
        return nodes
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise VlmpruneError(f"{path} is not a readable ONNX file ({exc})", "re-export the bundle") from None
