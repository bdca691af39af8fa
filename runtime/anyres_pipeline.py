"""The edge pipeline for LLaVA-NeXT (anyres) bundles: the image's best pinpoint picks the layout, the layout and the
keep ratio pick the bucket; the vision graph gets the views and the unpadding mask; the kept tokens are stitched in
transformers' order with the manifest's positions. Sessions, the decoder and the prompt are ``Pipeline``'s.

``open_pipeline`` returns the pipeline a bundle needs (its ``prompt.stitch``). Torch- and transformers-free.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmprune import graph_io
from vlmprune.bundle import bucket_for, load_manifest
from vlmprune.errors import VlmpruneError

from .anyres import AnyresPreprocessor, Layout, check_anyres_buckets
from .anyres_stitch import POSITION_MODES, stitch_anyres
from .pipeline import Pipeline, Result, Timings
from .sampling import check_generation_args
from .preprocess import load_image
from .decode_loop import decode


def default_positions(bundle: str | Path, verify: str = "quick") -> str:
    """The bundle's positions mode (``prompt.positions``, written at export from the method's default)."""
    return load_manifest(bundle, verify=verify)["prompt"].get("positions", "contiguous")


def open_pipeline(bundle: str | Path, *, positions: str | None = None, **kwargs) -> Pipeline:
    """``Pipeline`` or ``AnyresPipeline``, as the bundle's manifest says (``prompt.stitch``); ``positions`` None
    follows the manifest."""
    manifest = load_manifest(bundle, verify=kwargs.get("verify", "quick"))
    positions = positions or manifest["prompt"].get("positions", "contiguous")
    if manifest["prompt"].get("stitch") == "anyres_raster":
        return AnyresPipeline(bundle, positions=positions, **kwargs)
    if manifest["preprocessing"].get("kind") == "qwen2_vl":  # Qwen2.5-VL: M-RoPE positions (qwen_bundle.py)
        from .qwen_bundle import QwenBundlePipeline

        return QwenBundlePipeline(bundle, positions=positions, **kwargs)
    return Pipeline(bundle, positions=positions, **kwargs)


class AnyresPipeline(Pipeline):
    def __init__(self, bundle: str | Path, *, positions: str | None = None, **kwargs):
        if positions is None:  # the method's default, recorded at export (G-Prune: original, FoPru: contiguous)
            positions = load_manifest(bundle)["prompt"].get("positions", "contiguous")
        super().__init__(bundle, positions=positions, **kwargs)
        m = self.manifest
        if m["prompt"].get("stitch") != "anyres_raster":
            raise VlmpruneError(f"bundle {self.folder} is not an anyres (LLaVA-NeXT) bundle", "use Pipeline")
        side = m["vision"]["view"]["grid"][0]
        self.anyres = AnyresPreprocessor(m["preprocessing"], side)
        check_anyres_buckets(m)  # family field checks (issue 26), before any graph runs
        self.base_tokens = m["vision"]["view"]["num_patches"]
        spec = m["prompt"]["image_newline"]
        try:
            self.newline = np.load(self.bundle.path(spec["file"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VlmpruneError(f"cannot read {spec['file']}: {str(exc)[:160]}", "re-export the bundle") from None
        if list(self.newline.shape) != [self.table.shape[1]]:
            raise VlmpruneError(f"{spec['file']} has shape {list(self.newline.shape)}, expected [{self.table.shape[1]}]",
                                "re-export the bundle")

    def layouts(self) -> list[str]:
        return sorted({b["layout"] for b in self.manifest["vision"]["buckets"]})

    def choose_bucket_for_image(self, image: Image.Image, keep: float | None) -> tuple[dict, str]:
        w, h = image.size
        return self.choose_bucket_for(self.anyres.layout((h, w)), keep)

    def choose_bucket_for(self, layout: Layout, keep: float | None) -> tuple[dict, str]:
        """The bucket of the image's layout with this keep ratio (or the next larger)."""
        mine = [b for b in self.manifest["vision"]["buckets"] if b.get("layout") == layout.name]
        if not mine:
            raise VlmpruneError(f"the image's best pinpoint {list(layout.pinpoint)} needs layout {layout.name}, and "
                                f"the bundle has graphs only for {', '.join(self.layouts())}",
                                f"re-export with --layouts including {layout.name} (the default is all)")
        return bucket_for({"vision": {"buckets": mine}}, keep)

    def vision_anyres(self, pixels: np.ndarray, layout: Layout, size_hw, bucket: dict, prompt: str):
        values = {"pixel_values": pixels, "valid_mask": layout.valid_mask(size_hw).astype(np.float32)}
        t0 = time.perf_counter()
        text_ms = 0.0
        if graph_io.has(bucket["inputs"], "text_embeds"):
            values["text_embeds"] = self.text_embeds(prompt)
            text_ms = (time.perf_counter() - t0) * 1e3
        out = self.vision_backend(bucket).run(graph_io.feeds(bucket["inputs"], values, f"bucket {bucket['name']}"))
        return graph_io.by_kind(bucket["outputs"], out), text_ms

    def request(self, image: Image.Image | str | Path, prompt: str, *, keep: float | None = None,
                bucket: dict | None = None) -> dict:
        """Everything before the decoder: the bucket, the vision graph's outputs and the stitched prompt
        (``embeds``, ``positions``, ``next_pos``, and ``offsets``: each image token's place in the unpruned image)."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        w, h = image.size
        layout = self.anyres.layout((h, w))
        if bucket is None:
            bucket, _ = self.choose_bucket_for(layout, keep)
        elif bucket.get("layout") != layout.name:
            raise VlmpruneError(f"bucket {bucket['name']} is for layout {bucket.get('layout')}, the image needs "
                                f"{layout.name}", "let the pipeline choose the bucket (give --keep)")
        self.prepare(bucket)
        start = time.perf_counter()
        t = Timings()
        pixels, size_hw, _ = self.anyres(image)
        t.preprocess_ms = (time.perf_counter() - start) * 1e3
        ids = self.prompt.encode(prompt)
        total = layout.num_tokens(size_hw, self.base_tokens)
        max_ctx = self.decoder_spec["max_context"]
        t0 = time.perf_counter()
        out, text_ms = self.vision_anyres(pixels, layout, size_hw, bucket, prompt)
        t.text_encoder_ms = text_ms
        t.vision_ms = (time.perf_counter() - t0) * 1e3 - text_ms
        embeds, positions, next_pos, offsets = stitch_anyres(ids, self.prompt.image_token_id, self.table,
                                                             self.newline, out, layout, size_hw, self.positions)
        if next_pos >= max_ctx:
            raise VlmpruneError(f"the prompt's positions reach {next_pos - 1} ({len(offsets)} of {total} image tokens"
                                f" kept), past the model's context of {max_ctx}",
                                "shorten the prompt, use a smaller keep ratio or --positions contiguous")
        return {"bucket": bucket, "layout": layout, "size_hw": size_hw, "ids": ids, "outputs": out, "total": total,
                "embeds": embeds, "positions": positions, "next_pos": next_pos, "offsets": offsets, "timings": t,
                "start": start, "pixels": pixels}

    def generate(self, image: Image.Image | str | Path, prompt: str, *, keep: float | None = None,
                 bucket: dict | None = None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> Result:
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        if self.positions not in POSITION_MODES:
            raise VlmpruneError(f"unknown positions mode {self.positions!r}", f"choose one of {POSITION_MODES}")
        req = self.request(image, prompt, keep=keep, bucket=bucket)
        bucket, t, start, embeds, positions, next_pos, offsets = (req["bucket"], req["timings"], req["start"],
                                                                  req["embeds"], req["positions"], req["next_pos"],
                                                                  req["offsets"])
        max_ctx = self.decoder_spec["max_context"]
        out = decode(self.decoder, self.table, embeds, positions, next_pos, max_context=max_ctx,
                     max_new_tokens=max_new_tokens, eos=self.decoder_spec.get("eos_token_id"),
                     decode_text=self.prompt.decode, timings=t, start=start, temperature=temperature, top_p=top_p,
                     seed=seed, on_text=on_text, ignore_eos=ignore_eos)
        generated, text, stop = out.tokens, out.text, out.stop
        return Result(text=text, token_ids=generated, bucket=bucket["name"], keep=bucket["keep"],
                      visual_tokens_kept=len(offsets), visual_tokens_total=req["total"], prompt_tokens=embeds.shape[1],
                      tokens_generated=len(generated), stop_reason=stop, kept_indices=offsets.tolist(), timings=t)
