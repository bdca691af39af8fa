"""The ONNX protobuf wire format, read without the ``onnx`` package (the edge install has none): the external-data
locations a graph names. ONNX Runtime opens those files relative to the graph's folder when it loads the graph, so
they must be checked like every other file a bundle names (a re-sealed graph could otherwise read an unrecorded
copy of its weights). Field numbers from onnx/onnx.proto; messages are walked, large fields skipped by length."""

from __future__ import annotations

import mmap
from pathlib import Path

from .errors import VlmpruneError

MAX_DEPTH = 64  # subgraphs (If, Loop, Scan) nest; a crafted file could nest them without end

# message -> {field: message type of that length-delimited field}
_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_TENSOR_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 13, 1, 2


def varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf, start: int, end: int):
    """(field number, (start, end)) of the length-delimited fields in buf[start:end]; the others are skipped."""
    i = start
    while i < end:
        key, i = varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(buf, i)
            if i + n > end:
                raise ValueError("field runs past its message")
            yield key >> 3, (i, i + n)
            i += n
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unexpected wire type {wire}")


def _walk(buf, start: int, end: int, kind: str, depth: int, out: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"graphs nested more than {MAX_DEPTH} deep")
    if kind == "entry":
        key = value = None
        for f, (s, e) in fields(buf, start, end):
            if f == _ENTRY_KEY:
                key = bytes(buf[s:e]).decode("utf-8")
            elif f == _ENTRY_VALUE:
                value = bytes(buf[s:e]).decode("utf-8")
        if key == "location" and value is not None:
            out.append(value)
        return
    children = _MESSAGES[kind]
    for f, (s, e) in fields(buf, start, end):
        child = children.get(f)
        if child is not None:
            _walk(buf, s, e, child, depth + (child == "graph"), out)


def external_locations(path: Path) -> list[str]:
    """Every external-data ``location`` the graph at ``path`` names (initializers, sparse initializers, tensors in
    node attributes, subgraphs and functions), in file order."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                buf = memoryview(m)
                try:
                    out: list[str] = []
                    _walk(buf, 0, len(buf), "model", 0, out)
                    return out
                finally:
                    buf.release()
    except (ValueError, IndexError, UnicodeDecodeError, RecursionError) as exc:
        raise VlmpruneError(f"{path} is not a readable ONNX file ({exc})", "re-export the bundle") from None


_GRAPH_NODE, _NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE = 1, 1, 2, 4


def main_graph_nodes(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(op_type, inputs, outputs) of each node of the main graph, in file order."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                buf = memoryview(m)
                try:
                    nodes = []
                    for field, (gs, ge) in fields(buf, 0, len(buf)):
                        if field != 7:  # ModelProto.graph
                            continue
                        for gfield, (ns, ne) in fields(buf, gs, ge):
                            if gfield != _GRAPH_NODE:
                                continue
                            op, ins, outs = "", [], []
                            for nfield, (s, e) in fields(buf, ns, ne):
                                if nfield == _NODE_INPUT:
                                    ins.append(bytes(buf[s:e]).decode("utf-8"))
                                elif nfield == _NODE_OUTPUT:
                                    outs.append(bytes(buf[s:e]).decode("utf-8"))
                                elif nfield == _NODE_OP_TYPE:
                                    op = bytes(buf[s:e]).decode("utf-8")
                            nodes.append((op, ins, outs))
                    return nodes
                finally:
                    buf.release()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise VlmpruneError(f"{path} is not a readable ONNX file ({exc})", "re-export the bundle") from None
