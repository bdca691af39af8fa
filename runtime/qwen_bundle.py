"""Qwen2.5-VL bundles (``prune-export`` with a ``qwen2_5_vl`` model) in the generic runtime: the ``Pipeline`` with
Qwen's preprocessing (``qwen_preprocess``), the auxiliary CLIP's inputs for GridPrune, the kept tokens stitched
with their M-RoPE positions (``qwen_positions``) and the decoder stepped with ``position_ids [3, 1, 1]``.
``prune-run`` reaches it through ``anyres_pipeline.open_pipeline`` (the manifest's ``preprocessing.kind``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmprune import graph_io
from vlmprune.bundle import load_manifest
from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import DecoderNames

from .decode_loop import decode
from .pipeline import Pipeline, Result, Timings
from .preprocess import load_image
from .qwen_positions import MODES, stitch_qwen
from .qwen_preprocess import QwenPreprocessor, check_auxiliary_clip, check_qwen_buckets, clip_view
from .sampling import check_generation_args


class QwenBundlePipeline(Pipeline):
    def __init__(self, bundle: str | Path, *, positions: str | None = None, **kwargs):
        if kwargs.get("engines") is not None:
            raise VlmpruneError("TensorRT engines for Qwen2.5-VL bundles (an M-RoPE decoder) are not supported yet",
                                "run the bundle on ONNX Runtime (leave out --engines)")
        if positions is None:  # the method's default, recorded at export
            positions = load_manifest(bundle, verify=kwargs.get("verify", "quick"))["prompt"].get("positions",
                                                                                                  "original")
        if positions not in MODES:
            raise VlmpruneError(f"unknown positions mode {positions!r}", f"choose one of {', '.join(MODES)}")
        super().__init__(bundle, positions=positions, **kwargs)
        m = self.manifest
        if m["preprocessing"].get("kind") != "qwen2_vl":
            raise VlmpruneError(f"bundle {self.folder} is not a Qwen2.5-VL bundle", "use Pipeline")
        rank = DecoderNames.of(m["decoder"]).position_rank
        if rank != 3:
            raise VlmpruneError(f"bundle {self.folder}: its decoder takes position_ids of rank {rank}, not M-RoPE's 3",
                                "re-export the bundle")
        self.qwen_preprocess = QwenPreprocessor(m["preprocessing"])
        self.preprocess = _WholeImageView(self.qwen_preprocess)  # what prune-viz and the generic callers use
        self.grid = tuple(m["vision"]["view"]["grid"])
        self.clip_constants = m.get("auxiliary_clip")
        check_qwen_buckets(m, m["preprocessing"])  # family field checks (issue 26), before any graph runs
        if self.clip_constants is not None:
            check_auxiliary_clip(self.clip_constants)

    def vision(self, pixel_values: np.ndarray, bucket: dict, prompt: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``Pipeline.vision`` for the generic callers (prune-viz): the image the pixels came from (the last one
        ``self.preprocess`` saw) gives GridPrune's auxiliary-CLIP view."""
        t = Timings()
        out = self._run_vision(pixel_values, self.preprocess.last_image, bucket, prompt, t)
        return out["image_embeds"], out["kept_indices"].astype(np.int64), t.text_encoder_ms

    def _run_vision(self, pixels: np.ndarray, image: Image.Image, bucket: dict, prompt: str, t: Timings) -> dict:
        """The bucket's vision graph on the image; its outputs by kind (``t``: preprocessing, text and vision time)."""
        feeds = self.vision_feeds(pixels, image, bucket, prompt, t)
        t0 = time.perf_counter()
        out = self.vision_backend(bucket).run(feeds)
        t.vision_ms = (time.perf_counter() - t0) * 1e3
        return graph_io.by_kind(bucket["outputs"], out)

    def vision_feeds(self, pixels: np.ndarray, image: Image.Image, bucket: dict, prompt: str, t: Timings) -> dict:
        """The bucket graph's feeds, keyed by its recorded input names (``t``: preprocessing and text time)."""
        feeds = {"pixel_values": pixels}
        if graph_io.has(bucket["inputs"], "text_embeds"):  # GridPrune: the auxiliary CLIP's inputs
            if not self.clip_constants:
                raise VlmpruneError("the bundle's GridPrune graph needs its auxiliary_clip block, which is missing",
                                    "re-export the bundle")
            t0 = time.perf_counter()
            feeds["clip_pixel_values"] = clip_view(image, self.clip_constants)
            t1 = time.perf_counter()
            feeds["text_embeds"] = self.text_embeds(prompt)
            t.preprocess_ms += (t1 - t0) * 1e3
            t.text_encoder_ms = (time.perf_counter() - t1) * 1e3
        return graph_io.feeds(bucket["inputs"], feeds, f"bucket {bucket['name']}")

    def generate(self, image: Image.Image | str | Path, prompt: str, *, keep: float | None = None,
                 bucket: dict | None = None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> Result:
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        if bucket is None:
            bucket, _ = self.choose_bucket(keep)
        self.prepare(bucket)
        start = time.perf_counter()
        t = Timings()
        if not isinstance(image, Image.Image):
            image = load_image(image)
        pixels = self.qwen_preprocess(image)
        t.preprocess_ms = (time.perf_counter() - start) * 1e3
        ids = self.prompt.encode(prompt)
        out = self._run_vision(pixels, image, bucket, prompt, t)
        kept = out["kept_indices"].astype(np.int64)[0]
        embeds, positions, next_pos = stitch_qwen(ids, self.prompt.image_token_id, self.table, out["image_embeds"],
                                                  kept, self.grid, self.positions)
        max_ctx = self.decoder_spec["max_context"]
        if next_pos >= max_ctx:  # the last position id counts (original positions leave gaps), not the token count
            raise VlmpruneError(f"the prompt's position ids reach {next_pos - 1}, past the model's context of "
                                f"{max_ctx}", "shorten the prompt or use a bucket with fewer visual tokens (--keep)")
        out = decode(self.decoder, self.table, embeds, positions, next_pos, max_context=max_ctx,
                     max_new_tokens=max_new_tokens, eos=self.decoder_spec.get("eos_token_id"),
                     decode_text=self.prompt.decode, timings=t, start=start, temperature=temperature, top_p=top_p,
                     seed=seed, position_rank=3, on_text=on_text, ignore_eos=ignore_eos)
        generated, text, stop = out.tokens, out.text, out.stop
        return Result(text=text, token_ids=generated, bucket=bucket["name"], keep=bucket["keep"],
                      visual_tokens_kept=int(bucket["k"]), visual_tokens_total=self.num_patches,
                      prompt_tokens=int(embeds.shape[1]), tokens_generated=len(generated), stop_reason=stop,
                      kept_indices=kept.tolist(), timings=t)


class _WholeImageView:
    """The generic preprocessing interface over ``QwenPreprocessor``: the model sees the whole image (resized to the
    bucket, no crop), so its crop box is the image itself."""

    def __init__(self, qwen: QwenPreprocessor):
        self.qwen = qwen
        self.last_image: Image.Image | None = None

    def crop_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        return 0.0, 0.0, float(size[0]), float(size[1])

    def __call__(self, image: Image.Image) -> np.ndarray:
        self.last_image = image
        return self.qwen(image)
