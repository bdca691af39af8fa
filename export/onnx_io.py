"""Writing ONNX files: the TorchScript exporter at a pinned opset, and one weights file shared by many graphs."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from vlmprune.errors import VlmpruneError

# Tensors smaller than this stay inside the .onnx file (shape constants and the like).
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096  # page-aligned offsets so ONNX Runtime and TensorRT can mmap the weights


def export_onnx(module, args, *, input_names, output_names, dynamic_axes=None, opset: int = 17) -> onnx.ModelProto:
    """Trace ``module`` and return the ModelProto (weights inline; sharing happens when the bundle is written).

    The TorchScript exporter is used because it honours the requested opset exactly; the dynamo exporter writes
    opset 18 (ReduceMean axes as an input, which TensorRT 8.x silently ignores). The opset is checked anyway.
    """
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or {},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    written = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
    if written != opset:
        raise VlmpruneError(f"the exporter wrote opset {written}, not the requested {opset}", "report this as a bug")
    return model


def externalize(models: dict[str, onnx.ModelProto], folder: Path, weights_name: str) -> dict[str, int]:
    """Move the large initializers of every model into one file ``weights_name`` in ``folder``, each distinct tensor
    once (identical bytes, dtype and shape share one location), then save each model as ``folder/<name>``.

    This is how several bucket graphs share one copy of the encoder weights on disk. Returns the byte size of
    each written .onnx file.
    """
    weights_path = folder / weights_name
    offsets: dict[str, tuple[int, int]] = {}
    sizes: dict[str, int] = {}
    with open(weights_path, "wb") as out:
        for model in models.values():
            for tensor in _all_initializers(model):
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < _EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw + str((tensor.data_type, tuple(tensor.dims))).encode()).hexdigest()
                if key not in offsets:
                    pad = (-out.tell()) % _ALIGN
                    out.write(b"\0" * pad)
                    offsets[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = offsets[key]
                _point_external(tensor, weights_name, offset, length)
    for name, model in models.items():
        path = folder / name
        onnx.save_model(model, str(path))
        sizes[name] = path.stat().st_size
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
