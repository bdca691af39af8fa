"""The runtime half of the family contract: the hooks the one ``Pipeline`` calls, with the single-view defaults
(one view through the CLIP crop, the K kept tokens in place of the image placeholder, ``[B, S]`` positions).

A family overrides only what differs, in ``models/<family>/runtime.py`` (torch-free), as ONNX Runtime GenAI's model
builder subclasses its base ``Model``. The manifest's ``family`` key picks the class, once, through the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlmprune.bundle import Bundle, bucket_for
from vlmprune.errors import VlmpruneError
from vlmprune.models.registry import families, family_by_key

from .preprocess import Preprocessor, to_rgb
from .stitch import POSITION_MODES, stitch


@dataclass
class View:
    """One image as a bucket's graph takes it: its inputs by kind (``pixel_values``, ``valid_mask``,
    ``clip_pixel_values``; ``text_embeds`` is the pipeline's), and what the family needs to stitch and draw it."""

    image: Image.Image
    values: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)
    note: str = ""  # shown with the result, e.g. "layout 2x1" or "image size 448x448"


@dataclass
class Stitched:
    embeds: np.ndarray  # [1, L, D]
    positions: np.ndarray  # [1, L] or [3, 1, L]
    next_pos: int  # the first generated token's position
    kept: np.ndarray  # each kept image token's place in the unpruned image sequence
    total: int  # image tokens before pruning
    # the decoder's prefill-only inputs by kind (``graph_io.PREFILL_INPUTS``: DeepStack's rows and positions)
    decoder_inputs: dict[str, np.ndarray] = field(default_factory=dict)


class FamilyRuntime:
    """Single-view defaults. ``bundle``: the opened, verified bundle; ``table``: the token-embedding table."""

    position_modes: tuple[str, ...] = POSITION_MODES
    view_caption = "the center crop the model sees, resized"  # prune-viz's row title: how the panels show the image

    def __init__(self, bundle: Bundle, table: np.ndarray):
        self.check_manifest(bundle.manifest)
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.table = table
        view = self.manifest["vision"]["view"]
        self.num_patches = int(view["num_patches"])
        self.grid = tuple(view["grid"])
        self.preprocess = self.make_preprocessor()

    # --- declaration -------------------------------------------------------------------------------------------
    @classmethod
    def claims(cls, manifest: dict) -> bool:
        """Whether a manifest that names no family (written before version 4) is this family's."""
        return False

    @classmethod
    def check_manifest(cls, manifest: dict) -> None:
        """The family's own manifest fields (types, ranges, sizes), checked when a bundle of it is opened; one line
        naming the field. The shared schema (``vlmprune/manifest.py``) checks everything every family has."""

    @classmethod
    def default_positions(cls, manifest: dict) -> str:
        return manifest["prompt"].get("positions", cls.position_modes[0])

    def make_preprocessor(self):
        return Preprocessor(self.manifest["preprocessing"])

    # --- buckets -----------------------------------------------------------------------------------------------
    def buckets_for(self, image: Image.Image | None) -> list[dict]:
        """The buckets an image can use (every bucket here; a multi-layout family narrows them)."""
        return self.manifest["vision"]["buckets"]

    def choose_bucket(self, keep: float | None, image: Image.Image | None = None) -> tuple[dict, str]:
        return bucket_for({"vision": {"buckets": self.buckets_for(image)}}, keep)

    def check_bucket(self, bucket: dict, image: Image.Image) -> None:
        """Refuse a bucket given by name that cannot take this image."""

    # --- one request -------------------------------------------------------------------------------------------
    def prepare(self, image: Image.Image, bucket: dict) -> View:
        return View(image, {"pixel_values": self.preprocess(image)})

    def check_prompt(self, ids: list[int], image_token_id: int, bucket: dict, positions: str, max_ctx: int) -> None:
        """Refuse, before any graph runs, a prompt whose stitched length is known to fill the context."""
        k = bucket["k"]
        length = len(ids) - 1 + k
        if length >= max_ctx:
            raise VlmpruneError(f"the prompt is {length} tokens ({len(ids) - 1} text + {k} image), which fills the "
                                f"model's context of {max_ctx}",
                                "shorten the prompt or use a bucket with fewer visual tokens (--keep)")

    def stitch(self, ids: list[int], image_token_id: int, outputs: dict, view: View, positions: str) -> Stitched:
        kept = outputs["kept_indices"].astype(np.int64)
        embeds, pos, next_pos = stitch(ids, image_token_id, self.table, outputs["image_embeds"], kept,
                                       self.num_patches, positions)
        return Stitched(embeds, pos, next_pos, kept[0], self.num_patches)

    # --- pictures ------------------------------------------------------------------------------------------------
    def model_view(self, image: Image.Image, view: View | None = None) -> Image.Image:
        """The part of the image the model sees (prune-viz draws the kept tokens over it)."""
        box = self.preprocess.crop_box(image.size)
        return to_rgb(image).crop(tuple(int(round(v)) for v in box))

    def panels(self, image: Image.Image, bucket: dict, view: View, outputs: dict, stitched: Stitched, *,
               title: str, note: str, pool: int = 0) -> list[Image.Image]:
        """prune-viz's panels for one bucket: the model's view with the kept tokens boxed."""
        from .viz import PANEL, overlay

        shown = self.model_view(image, view).resize((PANEL, PANEL), Image.Resampling.BICUBIC)
        return [overlay(shown, stitched.kept.tolist(), self.grid, title, note, pool=pool)]


def family_key(manifest: dict) -> str:
    """The family a manifest belongs to: its ``family`` field (version 4), the family it recorded under
    ``model.family``, or the family whose runtime claims its layout (older bundles)."""
    key = manifest.get("family")
    if isinstance(key, str) and key:
        return key
    recorded = (manifest.get("model") or {}).get("family") or {}
    key = recorded.get("key") or recorded.get("model_type")
    if isinstance(key, str) and key in families():
        return key
    for key, fam in families().items():
        if fam.runtime_class().claims(manifest):
            return key
    raise VlmpruneError("the manifest names no model family this vlmprune can run", "re-export the bundle")


def runtime_class(manifest: dict) -> type[FamilyRuntime]:
    return family_by_key(family_key(manifest)).runtime_class()
