"""Qwen2.5-VL at run time: Qwen's preprocessing (``preprocess``: the whole image resized to the bucket's size,
flattened into patches), the auxiliary CLIP's input for GridPrune, and the kept merged tokens stitched with their
M-RoPE positions (``positions``). The decoder steps with ``position_ids [3, 1, 1]``. Torch-free."""

from __future__ import annotations

from PIL import Image

from vlmprune import graph_io
from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import DecoderNames
from vlmprune.models.qwen2_5_vl.positions import MODES, stitch_qwen
from vlmprune.models.qwen2_5_vl.preprocess import (QwenPreprocessor, check_auxiliary_clip, check_qwen_buckets,
                                                  check_qwen_constants, clip_view)
from vlmprune.runtime.family import FamilyRuntime, Stitched, View


class QwenRuntime(FamilyRuntime):
    position_modes = MODES
    view_caption = "the whole image, resized to the model's view"

    def __init__(self, bundle, table):
        super().__init__(bundle, table)
        rank = DecoderNames.of(self.manifest["decoder"]).position_rank
        if rank != 3:
            raise VlmpruneError(f"bundle {bundle.folder}: its decoder takes position_ids of rank {rank}, not M-RoPE's 3",
                                "re-export the bundle")
        self.clip_constants = self.manifest.get("auxiliary_clip")

    @classmethod
    def claims(cls, manifest: dict) -> bool:
        return manifest["preprocessing"].get("kind") == "qwen2_vl"

    @classmethod
    def check_manifest(cls, manifest: dict) -> None:
        """Grids, merge size and patch size against the image sizes; the auxiliary CLIP's constants (issue 26)."""
        check_qwen_constants(manifest["preprocessing"])
        check_qwen_buckets(manifest, manifest["preprocessing"])
        if manifest.get("auxiliary_clip") is not None:
            check_auxiliary_clip(manifest["auxiliary_clip"])

    def make_preprocessor(self):
        return QwenPreprocessor(self.manifest["preprocessing"])

    def prepare(self, image: Image.Image, bucket: dict) -> View:
        values = {"pixel_values": self.preprocess(image)}
        if graph_io.has(bucket["inputs"], "clip_pixel_values"):  # GridPrune: the auxiliary CLIP's view
            if not self.clip_constants:
                raise VlmpruneError("the bundle's GridPrune graph needs its auxiliary_clip block, which is missing",
                                    "re-export the bundle")
            values["clip_pixel_values"] = clip_view(image, self.clip_constants)
        h, w = self.preprocess.size
        return View(image, values, note=f"image size {w}x{h}")

    def stitch(self, ids, image_token_id, outputs, view, positions) -> Stitched:
        kept = outputs["kept_indices"].astype("int64")[0]
        embeds, pos, next_pos = stitch_qwen(ids, image_token_id, self.table, outputs["image_embeds"], kept, self.grid,
                                            positions)
        return Stitched(embeds, pos, next_pos, kept, self.num_patches)

    def model_view(self, image, view=None):
        from vlmprune.runtime.preprocess import to_rgb

        return to_rgb(image)  # the model sees the whole image, resized (no crop)
