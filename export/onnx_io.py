"""Writing ONNX files: the TorchScript exporter at a pinned opset, and one weights file shared by many graphs."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from vlmprune.errors import VlmpruneError

# Tensors smaller than this stay inside the .onnx file (shape constants and the like).
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096  # page-aligned offsets so ONNX Runtime and TensorRT can mmap the weights


def export_onnx(module, args, path: Path, *, input_names, output_names, dynamic_axes=None,
                opset: int = 17, weights_as_inputs: bool = False) -> onnx.ModelProto:
    """Trace ``module`` straight to ``path`` and return its ModelProto *without* external data loaded.

    Writing to a file (not a buffer) is what lets torch use the external data format for graphs over protobuf's
    2 GiB limit: it then writes each large tensor to its own file beside ``path``, which ``WeightsFile`` streams into
    the bundle's weights file. Graphs under the limit come back with their weights inline (one graph at a time).

    The TorchScript exporter is used because it honours the requested opset exactly; the dynamo exporter writes
    opset 18 (ReduceMean axes as an input, which TensorRT 8.x silently ignores). The opset is checked anyway.

    ``weights_as_inputs``: torch writes no weights at all, only the graph with one input per parameter, named as
    in ``module.named_parameters()``; ``attach_weights`` then streams them into a weights file. This is how
    multi-GB decoders export within a small multiple of their size.
    """
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or {},
            do_constant_folding=not weights_as_inputs,
            export_params=not weights_as_inputs,
            keep_initializers_as_inputs=weights_as_inputs,
        )
    model = onnx.load(str(path), load_external_data=False)
    written = opset_of(model)
    if written != opset:
        raise VlmpruneError(f"the exporter wrote opset {written}, not the requested {opset}", "report this as a bug")
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_initializers(model))


class WeightsFile:
    """One external-data file shared by several graphs, written by streaming: each tensor's bytes are copied from
    where they are (inline in the proto, or a file torch wrote beside the graph) to the end of the file, hashed on
    the way, and dropped again if an identical tensor (bytes, dtype, shape) is already stored. So buckets share
    one copy of the encoder, and at most one tensor is in memory on top of the graph being written.

    Written by hand because onnx's ``convert_model_to_external_data`` neither deduplicates across models nor streams
    from torch's per-tensor files; offsets are page-aligned so ONNX Runtime and TensorRT can mmap them.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._out = open(self.path, "wb")
        self._index: dict[str, tuple[int, int]] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def flush(self) -> None:
        """Make what is written readable by another reader (a validation session) while the file stays open."""
        self._out.flush()

    def close(self) -> None:
        if not self._out.closed:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()

    def add_model(self, model: onnx.ModelProto, source_dir: Path | None = None) -> None:
        """Move every large tensor of ``model`` into this file and point the proto at it."""
        for tensor in _all_initializers(model):
            self.add_tensor(tensor, source_dir)

    def add_tensor(self, tensor: onnx.TensorProto, source_dir: Path | None = None) -> None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if _location(tensor) == self.name:
                return  # already stored here
            if source_dir is None:
                raise ValueError(f"{tensor.name} has external data but no source folder was given")
            info = {e.key: e.value for e in tensor.external_data}
            src = Path(source_dir) / info["location"]
            offset, length = int(info.get("offset", 0)), info.get("length")
            length = int(length) if length is not None else src.stat().st_size - offset
            offset, length = self._store(_file_blocks(src, offset, length), tensor.data_type, tensor.dims)
        else:
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(raw) < _EXTERNAL_MIN_BYTES:
                return
            offset, length = self._store([raw], tensor.data_type, tensor.dims)
            del raw
        _point_external(tensor, self.name, offset, length)

    def add_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Store ``array`` (e.g. a memory-mapped checkpoint tensor) and return an initializer pointing at it."""
        array = np.ascontiguousarray(array)
        tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=list(array.shape))
        offset, length = self._store([memoryview(array).cast("B")], tensor.data_type, tensor.dims)
        _point_external(tensor, self.name, offset, length)
        return tensor

    def _store(self, blocks, data_type: int, dims) -> tuple[int, int]:
        """Append ``blocks`` at the next aligned offset, hashing on the way; keep the first copy of identical data."""
        out = self._out
        out.seek(0, os.SEEK_END)
        end = out.tell()
        pad = (-end) % _ALIGN
        out.write(b"\0" * pad)
        digest = hashlib.sha256(str((data_type, tuple(dims))).encode())
        length = 0
        for block in blocks:
            digest.update(block)
            out.write(block)
            length += len(block)
        key = digest.hexdigest()
        if key in self._index:  # identical tensor already stored: take back what was just written
            out.truncate(end)
        else:
            self._index[key] = (end + pad, length)
        return self._index[key]


def _file_blocks(src: Path, offset: int, length: int, size: int = 1 << 24):
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, size))
            if not block:
                raise VlmpruneError(f"{src.name} is shorter than the graph says", "report this as a bug")
            left -= len(block)
            yield block


def attach_weights(model: onnx.ModelProto, tensors: dict, weights: WeightsFile) -> None:
    """Turn the graph inputs named after module tensors (an export with ``weights_as_inputs``) into initializers
    streamed into ``weights`` one tensor at a time, straight from the (memory-mapped) checkpoint tensors.

    A weight read only by 2-D Transposes (how ``nn.Linear`` traces) is stored transposed and the Transpose dropped:
    what torch's constant folding would do, done here because that folding materialises every transposed weight at
    once and then serialises the whole graph in memory (9 GB for a 2 GB decoder)."""
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    params = [i for i in graph.input if i.name in tensors]
    folded, new_inits = set(), []
    for inp in params:
        array = tensors[inp.name].detach().cpu().numpy()
        users = consumers.get(inp.name, [])
        transposes = [n for n in users if n.op_type == "Transpose" and array.ndim == 2
                      and [a.ints for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])]
        if users and len(transposes) == len(users):
            t = np.ascontiguousarray(array.T)
            for node in transposes:
                new_inits.append(weights.add_array(node.output[0], t))
                folded.add(node.output[0])
            del t
        else:
            new_inits.append(weights.add_array(inp.name, array))
    keep_inputs = [i for i in graph.input if i.name not in tensors]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    nodes = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)


def _location(tensor: onnx.TensorProto) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def save_graph(model: onnx.ModelProto, path: Path) -> int:
    """Write a graph whose large tensors already live in a weights file (so the proto is small); returns bytes."""
    onnx.save_model(model, str(path))
    return Path(path).stat().st_size


def externalize(models: dict[str, onnx.ModelProto], folder: Path, weights_name: str) -> dict[str, int]:
    """Write in-memory ``models`` to ``folder`` sharing one weights file ``weights_name``; returns .onnx sizes."""
    sizes = {}
    with WeightsFile(folder / weights_name) as weights:
        for name, model in models.items():
            weights.add_model(model)
            sizes[name] = save_graph(model, folder / name)
    return sizes


def _all_initializers(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:  # large Constant nodes as well (folded weights end up there sometimes)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _point_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def opset_of(model: onnx.ModelProto) -> int:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx", 0)
