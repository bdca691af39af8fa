"""Validation after export (as optimum does): every written ONNX graph in ONNX Runtime against the PyTorch modules.

Vision buckets on an image the tool makes and on random input: max abs difference of ``image_embeds`` within the
tolerance and identical kept indices in fp32 (set overlap reported, and required above a floor, in fp16). The text
encoder on a prompt. The decoder's logits and presents for a prefill and a second step with the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

# |ort - torch| <= ATOL + RTOL * max|torch|, per output.
TOLERANCE = {"fp32": {"atol": 1e-4, "rtol": 1e-4, "min_overlap": 1.0}, "fp16": {"atol": 2e-2, "rtol": 2e-2, "min_overlap": 0.9}}


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    allowed: float
    passed: bool
    index_overlap: float | None = None
    indices_equal: bool | None = None


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(graph, case, name, ref: np.ndarray, got: np.ndarray, tol) -> Check:
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    allowed = tol["atol"] + tol["rtol"] * float(np.max(np.abs(ref))) if ref.size else tol["atol"]
    return Check(graph, case, name, diff, allowed, bool(diff <= allowed and np.isfinite(diff)))


def _indices(graph, case, ref: np.ndarray, got: np.ndarray, tol) -> Check:
    ref_set, got_set = set(ref.reshape(-1).tolist()), set(got.reshape(-1).tolist())
    overlap = len(ref_set & got_set) / max(1, len(ref_set))
    equal = bool(np.array_equal(ref, got))
    passed = equal if tol["min_overlap"] >= 1.0 else overlap >= tol["min_overlap"]
    return Check(graph, case, "kept_indices", 0.0, 0.0, passed, overlap, equal)


def vision_cases(adapter, seed: int = 0) -> dict[str, torch.Tensor]:
    from vlmprune.sample import make_sample_image

    image = make_sample_image()
    pixels = adapter.processor.image_processor(image, return_tensors="pt")["pixel_values"].float()
    g = torch.Generator().manual_seed(seed)
    return {"sample image": pixels, "random input": torch.randn(pixels.shape, generator=g)}


def validate_vision(folder: Path, graphs: dict, adapter, text_embeds, precision: str) -> list[Check]:
    """``graphs``: file name -> (torch module, needs_text)."""
    tol = TOLERANCE[precision]
    checks = []
    cases = vision_cases(adapter)
    for file, (module, needs_text) in graphs.items():
        sess = _session(folder / file)
        for case, pixels in cases.items():
            args = (pixels, text_embeds) if needs_text else (pixels,)
            with torch.no_grad():
                ref_embeds, ref_idx = module(*args)
            feeds = {"pixel_values": pixels.numpy()}
            if needs_text:
                feeds["text_embeds"] = text_embeds.numpy()
            got_embeds, got_idx = sess.run(["image_embeds", "kept_indices"], feeds)
            idx_check = _indices(file, case, ref_idx.numpy(), got_idx, tol)
            checks.append(idx_check)
            if idx_check.indices_equal:
                checks.append(_compare(file, case, "image_embeds", ref_embeds.numpy(), got_embeds, tol))
            else:  # compare the tokens both kept
                common = sorted(set(ref_idx[0].tolist()) & set(got_idx[0].tolist()))
                r = ref_embeds[0].numpy()[[ref_idx[0].tolist().index(i) for i in common]]
                o = got_embeds[0][[got_idx[0].tolist().index(i) for i in common]]
                checks.append(_compare(file, case, "image_embeds (common tokens)", r, o, tol))
    return checks


def validate_text_encoder(folder: Path, file: str, module, input_ids: torch.Tensor) -> list[Check]:
    sess = _session(folder / file)
    with torch.no_grad():
        ref = module(input_ids).numpy()
    got = sess.run(["text_embeds"], {"input_ids": input_ids.numpy()})[0]
    return [_compare(file, "prompt", "text_embeds", ref, got, TOLERANCE["fp32"])]


def validate_decoder(folder: Path, file: str, module, num_layers: int) -> list[Check]:
    from .decoder import decoder_io_names

    tol = TOLERANCE["fp32"]
    sess = _session(folder / file)
    names_in, names_out = decoder_io_names(num_layers)
    checks = []
    ref_cache = got_cache = None
    past = 0
    for case, seq in (("prefill", 9), ("step with cache", 1)):
        inputs = module.example_inputs(seq=seq, past=0)
        embeds = inputs[0]
        mask = torch.ones(1, past + seq, dtype=torch.int64)
        positions = torch.arange(past, past + seq).unsqueeze(0)
        if ref_cache is None:
            ref_cache = list(inputs[3:])
            got_cache = [c.numpy() for c in ref_cache]
        with torch.no_grad():
            ref = module(embeds, mask, positions, *ref_cache)
        feeds = dict(zip(names_in, [embeds.numpy(), mask.numpy(), positions.numpy(), *got_cache]))
        got = sess.run(names_out, feeds)
        for name, r, o in zip(names_out, ref, got):
            if name == "logits" or name.startswith("present.0."):
                checks.append(_compare(file, case, name, r.numpy(), o, tol))
        ref_cache = list(ref[1:])
        got_cache = list(got[1:])
        past += seq
    return checks


def summarise(checks: list[Check], precision: str) -> dict:
    return {
        "precision": precision,
        "tolerance": TOLERANCE[precision],
        "passed": all(c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
    }
