"""The one vision-export loop: every bucket's graph traced from the module its family builds (``FamilyExport.
bucket_graph``), written with its weights into the shared ``vision.weights``, linted, recorded, and validated against
PyTorch as soon as it is written, by output kind (one comparison for every family's outputs)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmprune.graph_io import ALIGNED_OUTPUTS, VISION_PARTS

from .onnx_io import WeightsFile
from .validate import TOLERANCE, Check, _compare, _indices, _session


@dataclass
class BucketGraph:
    """What a family gives for one bucket: the module, its example inputs by name (the names are the tensor
    kinds), its output names (kinds), and the bucket's own manifest fields."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    record: dict = field(default_factory=dict)
    # traced with the weights as graph inputs and streamed into vision.weights (False: traced with its weights,
    # which are then moved into vision.weights; for modules whose weights are not all parameters)
    streamed: bool = True


def export_buckets(req, hooks, adapter, buckets, target, needs_text, text_embeds, tmp: Path, scratch: Path, steps,
                   checks: list) -> tuple[list[dict], dict]:
    """One graph per bucket, all sharing ``vision.weights``; each validated as soon as it is written."""
    from .exporter import _export_streamed, _finish_graph, _fold
    from .onnx_io import export_onnx, has_external_data

    records, lint = [], {}
    half = hooks.half_precision if req.precision == "fp16" else (lambda adapter: contextlib.nullcontext())
    with WeightsFile(tmp / "vision.weights") as weights:
        for bucket in buckets:
            with steps.step(f"export vision graph {bucket.name}"):
                graph = hooks.bucket_graph(adapter, bucket, needs_text, text_embeds)
                names, args = list(graph.inputs), tuple(graph.inputs.values())
                with half(adapter):
                    if graph.streamed:
                        model = _export_streamed(graph.module, args, scratch / bucket.file, weights,
                                                 input_names=names, output_names=graph.outputs, opset=target.opset)
                    else:
                        model = export_onnx(graph.module, args, scratch / bucket.file, input_names=names,
                                            output_names=graph.outputs, opset=target.opset)
                        if not has_external_data(model):
                            model = _fold(model)
                        weights.add_model(model, scratch)
                inputs, outputs = _finish_graph(model, bucket.file, tmp, scratch, weights, target, lint)
                del model
            records.append({"name": bucket.name, "method": bucket.method, "keep": bucket.keep, "k": bucket.k,
                            "options": dict(bucket.options), "file": bucket.file, "inputs": inputs,
                            "outputs": outputs, **graph.record})
            if req.validate:
                with steps.step(f"validate {bucket.file}"):
                    cases = hooks.validation_cases(adapter, bucket, graph, text_embeds)
                    checks += validate_graph(tmp / bucket.file, graph, cases, req.precision, lambda: half(adapter))
    return records, lint


def validate_graph(path: Path, graph: BucketGraph, cases: dict[str, dict[str, Any]], precision: str,
                   half=contextlib.nullcontext) -> list[Check]:
    """The written graph in ONNX Runtime against its PyTorch module on each case (inputs by name)."""
    sess = _session(path)
    checks = []
    for case, inputs in cases.items():
        with torch.no_grad(), half():
            ref = dict(zip(graph.outputs, (t.numpy() for t in graph.module(*inputs.values()))))
        got = dict(zip(graph.outputs, sess.run(graph.outputs, {k: v.numpy() for k, v in inputs.items()})))
        checks += compare_outputs(path.name, case, ref, got, precision)
    return checks


def compare_outputs(file: str, case: str, ref: dict, got: dict, precision: str) -> list[Check]:
    """Each kept sequence of a vision graph's outputs (``graph_io.VISION_PARTS``): its valid count exactly, its kept
    indices (identical in fp32, overlapping above a floor in fp16), and its embeddings where the indices agree (else
    over the tokens both kept)."""
    tol = TOLERANCE[precision]
    checks = []
    for embeds, indices, count in VISION_PARTS:
        if embeds not in ref:
            continue
        label = case if embeds == "image_embeds" else f"{case} ({embeds.split('_')[0]})"
        n = ref[indices].shape[1]
        if count is not None:
            n = int(np.asarray(ref[count]).reshape(-1)[0])
            got_n = int(np.asarray(got[count]).reshape(-1)[0])
            checks.append(Check(file, case, count, float(abs(n - got_n)), 0.0, n == got_n))
        ri, oi = ref[indices][:, :n], got[indices][:, :n]
        idx = _indices(file, label, ri, oi, tol)
        checks.append(idx)
        r, o = ref[embeds][:, :n], got[embeds][:, :n]
        aligned = [name for name, follows in ALIGNED_OUTPUTS.items() if follows == indices and name in ref]
        if idx.indices_equal:
            checks.append(_compare(file, label, embeds, r, o, tol))
            checks += [_compare(file, label, name, ref[name][:, :n], got[name][:, :n], tol) for name in aligned]
        else:  # compare the tokens both kept
            rl, ol = ri[0].tolist(), oi[0].tolist()
            common = sorted(set(rl) & set(ol))
            rows_r, rows_o = [rl.index(i) for i in common], [ol.index(i) for i in common]
            checks.append(_compare(file, label, f"{embeds} (common tokens)", r[0][rows_r], o[0][rows_o], tol))
            checks += [_compare(file, label, f"{name} (common tokens)", ref[name][:, rows_r], got[name][:, rows_o],
                                tol) for name in aligned]
    return checks
