"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, the ``llava-hf/llava-v1.6-*-hf`` layout): the LLaVA-1.5 CLIP
tower and projector run on several views of one image (a base view plus the crops of the best pinpoint), and the
crops' tokens form one high-resolution raster, unpadded to the image's aspect ratio, with ``image_newline`` after
every row.

The view plan is static per pinpoint layout (``Layout``: rows x cols crops); the unpadding depends on the image, so
it reaches the graphs as a mask (``runtime/anyres.py`` holds the torch-free geometry both sides use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlmprune.errors import VlmpruneError
from vlmprune.models.llava_next.geometry import Layout, layouts_for

from vlmprune.models.adapter import ClipText, Preprocessing, ViewSpec, VisionSpec
from vlmprune.models.llava.adapter import LlavaAdapter, _first_attr, preprocessing_from


def config_layouts(path: Path) -> list[Layout] | None:
    """The checkpoint's pinpoint layouts from its config.json alone (what the adapter derives after loading, checked
    there against the processor's), or None when the config does not state them."""
    from vlmprune.models.loading import _read_config

    cfg = _read_config(path)
    vcfg = cfg.get("vision_config") or {}
    pinpoints, size, patch = cfg.get("image_grid_pinpoints"), vcfg.get("image_size"), vcfg.get("patch_size")
    if not (isinstance(pinpoints, list) and pinpoints and type(size) is int and type(patch) is int and patch > 0):
        return None
    try:
        return layouts_for([tuple(int(x) for x in pp) for pp in pinpoints], size, size // patch)
    except (TypeError, ValueError):
        return None


class LlavaNextAdapter(LlavaAdapter):
    arch = "llava_next"

    def __init__(self, model, processor, path: Path, source: str, clip: ClipText | None = None):
        super().__init__(model, processor, path, source, clip)
        cfg = model.config
        vcfg = cfg.vision_config
        ip = processor.image_processor
        pinpoints = [tuple(int(x) for x in p) for p in (getattr(ip, "image_grid_pinpoints", None)
                                                        or cfg.image_grid_pinpoints)]
        if [list(p) for p in pinpoints] != [list(p) for p in cfg.image_grid_pinpoints]:
            raise VlmpruneError("the image processor's image_grid_pinpoints differ from the model config's",
                                "use the processor files published with the checkpoint")
        base = preprocessing_from(ip)
        if base.crop_size != (vcfg.image_size, vcfg.image_size):
            raise VlmpruneError(f"the processor's crop size {base.crop_size} is not the vision tower's "
                                f"{vcfg.image_size} px view", "use the processor files published with the checkpoint")
        self.preprocessing = Preprocessing(**{**base.__dict__, "kind": "anyres", "grid_pinpoints": tuple(pinpoints)})
        side = vcfg.image_size // vcfg.patch_size
        self.side = side
        self.layouts: list[Layout] = layouts_for(pinpoints, vcfg.image_size, side)
        view = (vcfg.image_size, vcfg.image_size)
        v = self.vision
        self.vision = VisionSpec(
            patch_size=v.patch_size, hidden_size=v.hidden_size, num_heads=v.num_heads, num_layers=v.num_layers,
            feature_layer=v.feature_layer, layers_run=v.layers_run,
            # every crop is a view of the same geometry as the base view
            views=(ViewSpec("base", view, (side, side), True), ViewSpec("crop", view, (side, side), True)),
        )

    @property
    def image_newline(self) -> Tensor:
        return _first_attr(self.model, "model.image_newline", "image_newline")

    def layout(self, name: str) -> Layout:
        for lay in self.layouts:
            if lay.name == name:
                return lay
        raise VlmpruneError(f"layout {name!r} is not one of this checkpoint's pinpoint layouts",
                            f"choose from {', '.join(l.name for l in self.layouts)}")

    def reference_image_features(self, pixel_values: Tensor, image_size: tuple[int, int] | None = None) -> Tensor:
        """[T, D]: transformers' own packed features (base view, then the unpadded raster with its newlines) for the
        views ``pixel_values`` [V, 3, S, S] of an image of ``image_size`` (h, w)."""
        if image_size is None:  # one view: the base-view features, as LLaVA-1.5 (the parity checks of the pieces)
            return super().reference_image_features(pixel_values)
        out = self.model.model.get_image_features(
            pixel_values=pixel_values[None], image_sizes=torch.tensor([list(image_size)]),
            vision_feature_layer=self.vision.feature_layer, vision_feature_select_strategy="default")
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return feats[0]

    def describe(self):
        d = super().describe()
        d["anyres"] = {"grid_pinpoints": [list(p) for p in self.preprocessing.grid_pinpoints],
                       "layouts": [lay.name for lay in self.layouts], "newline": True}
        return d


def next_processor(image_size: int, patch_size: int, max_context: int, pinpoints):
    """The offline tokenizer and a LLaVA-NeXT processor (anyres image processor, the LLaVA chat template) for made
    checkpoints; ``(processor, special token ids, vocabulary size)``."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from vlmprune.models.llava.preset import llava_processor

    base, ids, vocab = llava_processor(image_size, patch_size, max_context)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        resample=3,
        image_mean=list(base.image_processor.image_mean),
        image_std=list(base.image_processor.image_std),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=base.tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=base.chat_template,
    )
    return processor, ids, vocab
