"""Explicit quantisation (Q/DQ ONNX) of a vision bucket, for TensorRT 10.1+/11 strongly typed INT8 builds.

NVIDIA ModelOpt's ONNX PTQ is used when it is installed (it calibrates on CPU). Its ONNX extra pins
onnxruntime-gpu and CUDA wheels, so where it is absent the same Q/DQ form is produced with ONNX Runtime's static
quantiser (symmetric INT8, per-channel weights), which TensorRT also consumes. Either way only MatMul/Gemm/Conv are
quantised: the pruning subgraph, every LayerNorm and the attention softmax stay in floating point.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError

ALGOS = ("entropy", "minmax", "percentile")


def excluded_nodes(onnx_path: Path, float_scopes: tuple[str, ...] = (), pinned=None) -> list[str]:
    """Nodes left unquantised: the pruning subgraph and LayerNorms (as pinned for fp16 builds), every softmax, and
    the scopes in ``float_scopes``: the scoring layer's self-attention, whose Q/K the side branch reads (graph
    optimisers merge the two, so quantising that attention would put quantisation noise into the selection)."""
    import onnx

    from vlmprune.export.trt_build import _PIN, pinned_layers

    model = onnx.load(str(onnx_path), load_external_data=False)
    keep = {n.name for n in model.graph.node
            if n.op_type == "Softmax" or any(scope in n.name for scope in float_scopes)}
    return sorted(set(pinned_layers(onnx_path, pinned or _PIN)) | keep)


def modelopt_patterns(names: list[str]) -> list[str]:
    """ModelOpt matches ``nodes_to_exclude`` as regular expressions (``re.match`` against each node name), and node
    names are full of ``.``, ``[`` and ``/``: each name becomes an escaped, anchored pattern that matches only itself."""
    return [f"{re.escape(n)}$" for n in names]


def modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:
        return False
    return True


def quantize(onnx_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], algo: str,
             float_scopes: tuple[str, ...] = (), pinned=None) -> str:
    """Write the Q/DQ model; returns the tool used. ``pinned``: the family's fp32 pattern (``fp32_pattern``)."""
    if algo not in ALGOS:
        raise VlmpruneError(f"unknown calibration algorithm {algo!r}", f"choose one of {', '.join(ALGOS)}")
    exclude = excluded_nodes(onnx_path, float_scopes, pinned)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt takes the calibration data as one batch-concatenated array per input, which needs a batch axis; the
    # anyres graphs' leading axis is their views (and valid_mask has none), so those take ONNX Runtime's quantiser.
    batched = all(np.ndim(v) and np.shape(v)[0] == 1 for v in feeds[0].values())
    if batched and modelopt_available():  # pragma: no cover - not installable on this project's CPU machines
        if algo == "percentile":
            raise VlmpruneError("ModelOpt INT8 calibrates with entropy or max", "use --algo entropy or minmax")
        from modelopt.onnx.quantization import quantize as mo_quantize

        data = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        mo_quantize(onnx_path=str(onnx_path), quantize_mode="int8", calibration_data=data,
                    calibration_method={"entropy": "entropy", "minmax": "max"}[algo], calibration_eps=["cpu"],
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=modelopt_patterns(exclude),
                    # the parts left unquantised stay in the graph's fp32: ModelOpt's default "fp16" would convert
                    # them, the pruning subgraph and every LayerNorm included
                    high_precision_dtype="fp32", output_path=str(out_path))
        return "nvidia-modelopt"
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .data import FeedReader

    method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
              "percentile": CalibrationMethod.Percentile}[algo]
    # The quantiser prints its calibration steps on stdout and, per graph, warns twice that the model was not
    # pre-processed. Pre-processing (quant_pre_process) is shape inference, which static exported graphs do not need,
    # and graph optimisation, which would rename the nodes kept in float by name; so the chatter is captured and the
    # warning dropped, and prune-calibrate's own lines and progress bar stay readable.
    with contextlib.redirect_stdout(io.StringIO()), _without_log(_PREPROCESS_HINT):
        quantize_static(
            str(onnx_path), str(out_path), FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            nodes_to_exclude=exclude,
            per_channel=True,
            calibrate_method=method,
            # TensorRT takes symmetric INT8 with zero points of 0
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibMovingAverage": False},
        )
    return "onnxruntime.quantization"


_PREPROCESS_HINT = re.compile(r"consider (to run )?pre-processing before quantization", re.IGNORECASE)


@contextlib.contextmanager
def _without_log(pattern: re.Pattern):
    """Drop root-logger records matching ``pattern`` while the block runs (the quantiser logs through the root)."""

    class Drop(logging.Filter):
        def filter(self, record):
            return not pattern.search(record.getMessage())

    drop, root = Drop(), logging.getLogger()
    root.addFilter(drop)  # a logger's filter sees every record logged on it, whichever handler is added later
    try:
        yield
    finally:
        root.removeFilter(drop)


def accuracy(fp32_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]],
             parts: list[tuple[str, str, str | None]]) -> dict:
    """The Q/DQ graph against fp32 in ONNX Runtime: embedding error and kept-index overlap over every kept sequence
    ``parts`` names, as (embeddings, kept indices, valid count or None) output names (anyres graphs keep two: the
    base view and the raster, whose first ``count`` slots are real)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(fp32_path), opts, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(qdq_path), opts, providers=["CPUExecutionProvider"])
    names = [n for part in parts for n in part if n]
    rel, cos, overlap = [], [], []
    for feed in feeds:
        r = dict(zip(names, ref.run(names, feed)))
        o = dict(zip(names, q.run(names, feed)))
        for embeds, indices, count in parts:
            n_ref = int(r[count].reshape(-1)[0]) if count else r[indices].shape[1]
            n_q = int(o[count].reshape(-1)[0]) if count else o[indices].shape[1]
            i_ref, i_q = r[indices][0][:n_ref].tolist(), o[indices][0][:n_q].tolist()
            if not i_ref:
                continue
            common = sorted(set(i_ref) & set(i_q))
            overlap.append(len(common) / len(i_ref))
            if not common:
                rel.append(1.0)
                cos.append(0.0)
                continue
            a = r[embeds][0][[i_ref.index(i) for i in common]]
            b = o[embeds][0][[i_q.index(i) for i in common]]
            rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)))
            cos.append(float(np.mean(np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1)
                                                                    * np.linalg.norm(b, axis=-1), 1e-12))))
    return {
        "images": len(feeds),
        "kept_index_overlap_mean": float(np.mean(overlap)),
        "kept_index_overlap_min": float(np.min(overlap)),
        "embedding_relative_error_mean": float(np.mean(rel)),
        "embedding_cosine_mean": float(np.mean(cos)),
    }
