"""prune-bench's peers on the same weights: ONNX Runtime GenAI (its model builder's model, its own generation loop)
and ``transformers`` eager ``generate``.

Every per-token figure is a difference of two timestamps taken in the same run (first token, last token), so it is
non-negative by construction; the benchmark reports medians of those per-run figures.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def ortgenai_available() -> str | None:
    """None when ONNX Runtime GenAI can run; otherwise why not (for the benchmark to print)."""
    try:
        import onnxruntime_genai  # noqa: F401
        import onnxruntime_genai.models.builder  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime-genai is not installed ({exc}); pip install -e '.[bench]'"
    return None


class OrtGenaiPeer:
    """ONNX Runtime GenAI on the same weights: its model builder's standard text model at the builder's defaults
    (token embedding inside, full logits), built from the loaded checkpoint, run by ``og.Generator``."""

    def __init__(self, adapter, precision: str, folder: Path, threads: int | None):
        import onnxruntime_genai as og

        from .decoder_fused import run_builder

        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        run_builder(adapter, folder, precision, "cpu", {})
        config_path = folder / "genai_config.json"
        config = json.loads(config_path.read_text())
        # The same thread count as the runtime's sessions (ONNX Runtime GenAI's own default is not the core count).
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads or os.cpu_count() or 1
        config_path.write_text(json.dumps(config, indent=2))
        self.og = og
        self.precision = precision
        self.model = og.Model(str(folder))
        self.vocab = int(config["model"]["vocab_size"])

    def prompt_ids(self, text_ids: list[int], image_token_id: int, k: int) -> np.ndarray:
        """The runtime's prompt with the image placeholder replaced by K token ids: the same length, so the same
        prefill work (ONNX Runtime GenAI takes token ids, not stitched embeddings)."""
        where = text_ids.index(image_token_id)
        fill = [5 + (i * 7919) % (self.vocab - 10) for i in range(k)]
        return np.asarray(text_ids[:where] + fill + text_ids[where + 1:], np.int32)

    def measure(self, ids: np.ndarray, new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)  # runs the prompt
        t1 = time.perf_counter()
        generator.generate_next_token()  # picks the first token from the prompt's logits
        t_first = time.perf_counter()
        for _ in range(new_tokens):  # each: the model on the last token, then the pick
            generator.generate_next_token()
        t_end = time.perf_counter()
        return {"prefill_ms": (t1 - t0) * 1e3, "first_token_ms": (t_first - t0) * 1e3,
                "tpot_ms": (t_end - t_first) * 1e3 / new_tokens}


class TransformersPeer:
    """Eager ``generate`` on the same weights, fed the same kept image features through ``inputs_embeds``: per run
    the image processor, the vision tower + the same pruning in PyTorch, and ``generate`` with a streamer that
    timestamps each new token."""

    def __init__(self, model: str, threads: int | None):
        import torch

        from vlmprune.models import load_model

        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.adapter = load_model(model, attn_implementation="eager")

    def prepare(self, bucket: dict, image, ids: list[int], image_token_id: int, text_embeds):
        """A zero-argument callable running one request and returning its timings."""
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        from vlmprune.prune import get_method

        from .graphs import BucketVisionGraph

        view = self.adapter.vision.views[0]
        module = get_method(bucket["method"]).build(bucket["k"], view.grid, view.has_cls, **bucket["options"])
        graph = BucketVisionGraph(self.adapter, module).eval()
        extra = (torch.from_numpy(text_embeds),) if text_embeds is not None and bucket["method"] != "none" else ()
        where = ids.index(image_token_id)
        table = self.adapter.embedding_table()
        model = self.adapter.model
        processor = self.adapter.processor.image_processor

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times = []

            def put(self, value):  # first call: the prompt; then one call per new token
                self.times.append(time.perf_counter())

            def end(self):
                pass

        def run(new_tokens: int) -> dict:
            stamps = Stamps()
            t0 = time.perf_counter()
            pv = processor(image, return_tensors="pt")["pixel_values"]
            feats = graph(pv, *extra)[0]
            embeds = torch.cat([table[ids[:where]], feats[0].to(table.dtype), table[ids[where + 1:]]])[None]
            t_gen = time.perf_counter()
            model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                           streamer=stamps)
            first, last = stamps.times[1], stamps.times[-1]
            return {"ttft_ms": (first - t0) * 1e3, "prefill_ms": (first - t_gen) * 1e3,
                    "tpot_ms": (last - first) * 1e3 / new_tokens}

        return run
