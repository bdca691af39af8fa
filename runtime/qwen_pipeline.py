"""Torch-free Qwen2.5-VL generation: preprocess at the bucket size, run the bucket's vision graph, stitch the kept
tokens into the chat prompt with their M-RoPE positions, decode greedily (or sampled) with the KV-cache decoder.

It reads a Qwen export folder as ``export/qwen_bundle.py`` writes it (``qwen.json`` beside the graphs); the bundle
manifest's generic ``Pipeline`` (``runtime/pipeline.py``) does not dispatch to it yet.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlmprune.errors import VlmpruneError

from .prompt import PromptBuilder
from .qwen_positions import MODES, stitch_qwen
from .qwen_preprocess import QwenPreprocessor, clip_view
from .sampling import next_token


@dataclass
class QwenResult:
    tokens: list[int]
    text: str
    kept_indices: np.ndarray
    prompt_length: int
    positions: np.ndarray = field(repr=False)  # [3, 1, S] of the prefill
    logits: list[np.ndarray] | None = field(default=None, repr=False)  # per step, when asked for
    # milliseconds: preprocess (both views), text_encoder, vision (graph incl. pruning), prefill, ttft, tpot, total
    timings: dict = field(default_factory=dict)


class QwenDecoder:
    """The decoder graph with its cache held as numpy arrays between steps (one ``session.run`` per step)."""

    def __init__(self, path: Path, spec: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.layers = int(spec["num_layers"])
        self.kv = (1, int(spec["num_kv_heads"]), 0, int(spec["head_dim"]))
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.outputs = ["logits"] + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.reset()

    def reset(self) -> None:
        self.past = [np.zeros(self.kv, np.float32) for _ in self.past_names]
        self.length = 0

    def step(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``embeds [1, S, D]``, ``positions [3, 1, S]`` -> the last position's logits [V]."""
        seq = embeds.shape[1]
        feeds = {"inputs_embeds": embeds.astype(np.float32), "position_ids": positions.astype(np.int64),
                 "attention_mask": np.ones((1, self.length + seq), np.int64), **dict(zip(self.past_names, self.past))}
        out = self.session.run(self.outputs, feeds)
        self.past = out[1:]
        self.length += seq
        return out[0][0, -1]


class QwenPipeline:
    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        try:
            self.spec = json.loads((self.folder / "qwen.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VlmpruneError(f"cannot read {self.folder / 'qwen.json'}: {exc}", "re-export the model") from None
        self.threads = threads
        s = self.spec
        self.prompt = PromptBuilder(self._file(s["prompt"]["tokenizer"]), s["prompt"])
        self.table = np.load(self._file(s["decoder"]["embeddings"]), mmap_mode="r")
        self.decoder = QwenDecoder(self._file(s["decoder"]["file"]), s["decoder"], threads)
        self._vision = {}
        self._text = None

    def _file(self, name: str) -> Path:
        path = (self.folder / name).resolve()
        if self.folder.resolve() not in path.parents or not path.is_file():
            raise VlmpruneError(f"{name!r} is not a file inside {self.folder}", "re-export the model")
        return path

    def bucket(self, name: str) -> dict:
        for b in self.spec["buckets"]:
            if b["name"] == name:
                return b
        raise VlmpruneError(f"no bucket {name!r}", f"choose from {', '.join(b['name'] for b in self.spec['buckets'])}")

    def vision(self, pixel_values: np.ndarray, bucket: dict, image: Image.Image,
               prompt: str) -> tuple[np.ndarray, np.ndarray]:
        import onnxruntime as ort

        if bucket["file"] not in self._vision:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._vision[bucket["file"]] = ort.InferenceSession(str(self._file(bucket["file"])), opts,
                                                                providers=["CPUExecutionProvider"])
        feeds = {"pixel_values": pixel_values}
        session = self._vision[bucket["file"]]
        if any(i.name == "text_embeds" for i in session.get_inputs()):  # GridPrune: the auxiliary CLIP's inputs
            t = getattr(self, "_timings", {})
            t0 = time.perf_counter()
            feeds["clip_pixel_values"] = clip_view(image, self.spec["auxiliary_clip"])
            t1 = time.perf_counter()
            feeds["text_embeds"] = self.text_embeds(prompt)
            t["clip_view_ms"] = (t1 - t0) * 1e3
            t["text_encoder_ms"] = (time.perf_counter() - t1) * 1e3
        embeds, kept = session.run(["image_embeds", "kept_indices"], feeds)
        return embeds[0], kept[0].astype(np.int64)

    def text_embeds(self, prompt: str) -> np.ndarray:
        import onnxruntime as ort

        from .prompt import load_tokenizer

        spec = self.spec["text_encoder"]
        if self._text is None:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._text = (ort.InferenceSession(str(self._file(spec["file"])), opts, providers=["CPUExecutionProvider"]),
                          load_tokenizer(self._file(spec["tokenizer"]), "CLIP tokenizer"))
        session, tokenizer = self._text
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        if len(ids) > spec["max_length"]:  # CLIP's 77-token window: keep the start and the end-of-text token
            ids = ids[: spec["max_length"] - 1] + ids[-1:]
        return session.run(["text_embeds"], {"input_ids": np.asarray([ids], np.int64)})[0]

    def generate(self, image: Image.Image, prompt: str, bucket: str, *, max_new_tokens: int = 32,
                 positions: str | None = None, temperature: float = 0.0, ignore_eos: bool = False,
                 keep_logits: bool = False) -> QwenResult:
        b = self.bucket(bucket)
        mode = positions or b.get("positions") or "original"
        if mode not in MODES:
            raise VlmpruneError(f"unknown positions mode {mode!r}", f"use one of {', '.join(MODES)}")
        t = {}
        start = time.perf_counter()
        pre = QwenPreprocessor({**self.spec["preprocessing"], "crop_size": b["image_size"]})
        pixels = pre(image)
        t["preprocess_ms"] = (time.perf_counter() - start) * 1e3
        ids = self.prompt.encode(prompt)
        self._timings = t
        t0 = time.perf_counter()
        image_embeds, kept = self.vision(pixels, b, image, prompt)
        t["vision_ms"] = (time.perf_counter() - t0) * 1e3 - t.get("text_encoder_ms", 0.0) - t.get("clip_view_ms", 0.0)
        t["preprocess_ms"] += t.pop("clip_view_ms", 0.0)
        t.setdefault("text_encoder_ms", 0.0)
        embeds, pos, next_pos = stitch_qwen(ids, self.prompt.image_token_id, self.table, image_embeds, kept,
                                            tuple(b["grid"]), mode)
        max_ctx = int(self.spec["decoder"]["max_context"])
        if next_pos + max_new_tokens > max_ctx:
            raise VlmpruneError(f"the prompt and {max_new_tokens} new tokens reach position {next_pos + max_new_tokens}"
                                f", past the model's context of {max_ctx}", "generate fewer tokens")
        eos = self.spec["decoder"].get("eos_token_id")
        self.decoder.reset()
        t0 = time.perf_counter()
        logits = self.decoder.step(embeds, pos)
        t["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        first = None
        out: list[int] = []
        step_pos = np.zeros((3, 1, 1), np.int64)
        rows = [] if keep_logits else None
        while True:
            if rows is not None:
                rows.append(np.array(logits, np.float32))
            token = next_token(logits, temperature)
            if first is None:
                first = time.perf_counter()
                t["ttft_ms"] = (first - start) * 1e3
            if token == eos and not ignore_eos:
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
            step_pos[:] = next_pos
            logits = self.decoder.step(np.asarray(self.table[token], np.float32)[None, None], step_pos)
            next_pos += 1
        end = time.perf_counter()
        t["total_ms"] = (end - start) * 1e3
        t["tpot_ms"] = (end - first) * 1e3 / (len(out) - 1) if len(out) > 1 else 0.0
        return QwenResult(out, self.prompt.decode(out), kept, embeds.shape[1], pos, rows, t)
