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

_MODEL_GRAPH, _GRAPH_NODE, _NODE_NAME, _NODE_OP_TYPE = 7, 1, 3, 4


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
