"""LLaVA-NeXT (anyres) at run time: the image's best pinpoint picks the layout, the layout and the keep ratio pick
the bucket; the graph gets the views and the unpadding mask; the kept tokens are stitched in transformers' order
(base view, then the raster rows each closed by the newline vector) with the manifest's positions. Torch-free."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlmprune.bundle import bucket_for
from vlmprune.errors import VlmpruneError
from vlmprune.models.llava_next.geometry import AnyresPreprocessor, Layout, check_anyres_buckets, layouts_for
from vlmprune.models.llava_next.stitch import POSITION_MODES, stitch_anyres
from vlmprune.models.llava_next.viz import ANYRES_VIEW
from vlmprune.runtime.family import FamilyRuntime, Stitched, View


class LlavaNextRuntime(FamilyRuntime):
    position_modes = POSITION_MODES
    view_caption = ANYRES_VIEW

    def __init__(self, bundle, table):
        super().__init__(bundle, table)
        spec = self.manifest["prompt"]["image_newline"]
        try:
            self.newline = np.load(bundle.path(spec["file"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VlmpruneError(f"cannot read {spec['file']}: {str(exc)[:160]}", "re-export the bundle") from None
        if list(self.newline.shape) != [table.shape[1]]:
            raise VlmpruneError(f"{spec['file']} has shape {list(self.newline.shape)}, expected [{table.shape[1]}]",
                                "re-export the bundle")

    @classmethod
    def claims(cls, manifest: dict) -> bool:
        return manifest["prompt"].get("stitch") == "anyres_raster"

    @classmethod
    def check_manifest(cls, manifest: dict) -> None:
        check_anyres_buckets(manifest)  # the buckets' parts against their outputs and views, before any graph runs

    def make_preprocessor(self):
        pre = AnyresPreprocessor(self.manifest["preprocessing"], int(self.manifest["vision"]["view"]["grid"][0]))
        self._layouts = {lay.name: lay for lay in layouts_for(pre.pinpoints, pre.view, pre.side)}
        return pre

    def layouts(self) -> list[str]:
        return sorted({b["layout"] for b in self.manifest["vision"]["buckets"]})

    def layout_of(self, image: Image.Image) -> Layout:
        w, h = image.size
        return self.preprocess.layout((h, w))

    def buckets_for(self, image: Image.Image | None) -> list[dict]:
        if image is None:
            return self.manifest["vision"]["buckets"]
        layout = self.layout_of(image)
        mine = [b for b in self.manifest["vision"]["buckets"] if b.get("layout") == layout.name]
        if not mine:
            raise VlmpruneError(f"the image's best pinpoint {list(layout.pinpoint)} needs layout {layout.name}, and "
                                f"the bundle has graphs only for {', '.join(self.layouts())}",
                                f"re-export with --layouts including {layout.name} (the default is all)")
        return mine

    def choose_bucket(self, keep, image=None):
        return bucket_for({"vision": {"buckets": self.buckets_for(image)}}, keep)

    def check_bucket(self, bucket: dict, image: Image.Image) -> None:
        layout = self.layout_of(image)
        if bucket.get("layout") != layout.name:
            raise VlmpruneError(f"bucket {bucket['name']} is for layout {bucket.get('layout')}, the image needs "
                                f"{layout.name}", "let the pipeline choose the bucket (give --keep)")

    def check_prompt(self, ids, image_token_id, bucket, positions, max_ctx) -> None:
        """The kept count is known only after the graph runs (the raster's valid tokens depend on the image)."""

    def prepare(self, image: Image.Image, bucket: dict) -> View:
        """The image tiled onto the bucket's layout: the image's own in a request (``check_bucket``); every layout's
        graph gets every image in INT8 calibration, as each layout's graph must see the whole range of images."""
        layout = self._layouts.get(bucket.get("layout")) or self.layout_of(image)
        pixels, size_hw, _ = self.preprocess(image, layout)
        return View(image, {"pixel_values": pixels, "valid_mask": layout.valid_mask(size_hw).astype(np.float32)},
                    {"layout": layout, "size_hw": size_hw}, f"layout {layout.name}")

    def stitch(self, ids, image_token_id, outputs, view, positions) -> Stitched:
        layout, size_hw = view.info["layout"], view.info["size_hw"]
        embeds, pos, next_pos, offsets = stitch_anyres(ids, image_token_id, self.table, self.newline, outputs, layout,
                                                       size_hw, positions)
        return Stitched(embeds, pos, next_pos, offsets, layout.num_tokens(size_hw, self.num_patches))

    def panels(self, image, bucket, view, outputs, stitched, *, title, note, pool=0):
        from vlmprune.models.llava_next.viz import bucket_panels

        return bucket_panels(image, bucket, view, outputs, self.num_patches)
