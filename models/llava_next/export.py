"""The LLaVA-NeXT (anyres) path of ``prune-export``: buckets per pinpoint layout and keep ratio, their graphs
(``anyres_graphs.py``) exported and validated like the single-view ones, and the manifest's anyres fields.

``export/exporter.py`` calls in here when the family's recipe has the ``anyres_raster`` layout; everything else
(the decoder, the text encoder, the bundle's sealing) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.models.llava_next.geometry import Layout, layout_for_image

from vlmprune.models.llava_next.graphs import OUTPUTS, AnyresVisionGraph, check_method, part_budgets
from vlmprune.export.family import FamilyExport
from vlmprune.export.vision_export import BucketGraph

@dataclass(frozen=True)
class AnyresBucket:
    method: str
    keep: float
    layout: Layout
    kb: int  # base view's K
    kr: int  # raster slots (the most this layout keeps; the image's own count is raster_count)
    options: tuple = ()

    @property
    def k(self) -> int:
        return self.kb + self.kr

    @property
    def name(self) -> str:
        return f"{self.method}-{self.layout.name}-k{self.k}"

    @property
    def file(self) -> str:
        return f"vision_{self.method}_{self.layout.name}_k{self.k}.onnx"


def plan_anyres(spec, options: dict, adapter, keeps, tokens, layouts: list[str] | None) -> list[AnyresBucket]:
    """The ``none`` bucket and one bucket per keep ratio, for every chosen layout (all of the checkpoint's by
    default)."""
    check_method(spec.name, options)
    if tokens:
        raise VlmpruneError("--tokens is not available for LLaVA-NeXT: each image's budget follows its own unpadded "
                            "token count", "give keep ratios, e.g. --keep 0.25")
    if not keeps:
        raise VlmpruneError("no budget given", "use --keep 0.25[,0.5,...]")
    chosen = [adapter.layout(name) for name in dict.fromkeys(layouts)] if layouts else list(adapter.layouts)
    opts = tuple(sorted(options.items()))
    out = []
    for lay in chosen:
        kb, kr = part_budgets("none", 1.0, lay)
        out.append(AnyresBucket("none", 1.0, lay, kb, kr))
        for keep in dict.fromkeys(float(k) for k in keeps):
            if spec.name == "none":
                continue
            kb, kr = part_budgets(spec.name, keep, lay)
            out.append(AnyresBucket(spec.name, keep, lay, kb, kr, opts))
    return out


def validation_size(layout: Layout, pinpoints) -> tuple[int, int]:
    """An image size (h, w) whose best pinpoint is ``layout`` and whose unpadding removes something."""
    ph, pw = layout.pinpoint
    for h, w in ((int(ph * 0.8), pw), (ph, int(pw * 0.8)), (ph, pw)):
        if layout_for_image((h, w), pinpoints, layout.view, layout.side) == layout:
            return h, w
    return ph, pw


def validation_cases(adapter, layout: Layout, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from vlmprune.models.llava_next.geometry import AnyresPreprocessor
    from vlmprune.sample import make_sample_image

    pre = adapter.preprocessing
    h, w = validation_size(layout, pre.grid_pinpoints)
    pixels, hw, lay = AnyresPreprocessor(pre.to_dict(), adapter.side)(make_sample_image(w, h))
    assert lay == layout, (lay, layout)
    mask = torch.from_numpy(layout.valid_mask(hw).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    return {f"sample image {w}x{h}": (torch.from_numpy(pixels), mask),
            "random input": (torch.randn(pixels.shape, generator=g), mask)}


def anyres_manifest(manifest: dict, adapter, spec, tmp: Path) -> None:
    """The anyres fields: layouts, the newline vector, the stitch layout and the method's default positions."""
    newline = adapter.image_newline.detach().float().numpy()
    np.save(tmp / "image_newline.npy", newline)
    vision = manifest["vision"]
    vision["layouts"] = [{"name": lay.name, "rows": lay.rows, "cols": lay.cols, "pinpoint": list(lay.pinpoint),
                          "num_views": lay.num_views, "raster": list(lay.raster)} for lay in adapter.layouts]
    prompt = manifest["prompt"]
    prompt["stitch"] = "anyres_raster"
    prompt["image_newline"] = {"file": "image_newline.npy", "shape": list(newline.shape), "dtype": "float32"}


class LlavaNextExport(FamilyExport):
    """Buckets per pinpoint layout and keep ratio, their anyres graphs, the layouts and newline in the manifest."""

    def plan(self, spec, options, adapter, keeps, tokens, family_options):
        return plan_anyres(spec, options, adapter, keeps, tokens, family_options.get("layouts"))

    def bucket_graph(self, adapter, bucket, needs_text, text_embeds):
        """The layout's views and unpadding mask through the anyres graph; its records name the layout and the K of
        each part (the base view's exact; the raster's the slot count, its budget per image round(keep * valid
        tokens), per crop for FoPru and GridPrune, returned as raster_count)."""
        lay = bucket.layout
        module = AnyresVisionGraph(adapter, lay, bucket.method, bucket.keep, dict(bucket.options)).eval()
        if (module.kb, module.kr) != (bucket.kb, bucket.kr):
            raise AssertionError(f"{bucket.name}: module returns K={module.kb}+{module.kr}")
        s = adapter.vision.views[0].image_size
        inputs = {"pixel_values": torch.zeros(lay.num_views, 3, *s), "valid_mask": torch.ones(*lay.raster)}
        if bucket.method != "none" and needs_text:
            inputs["text_embeds"] = torch.zeros_like(text_embeds)
        record = {
            "layout": lay.name, "num_views": lay.num_views,
            "parts": [{"name": "base", "views": [0], "n": lay.side * lay.side, "k": bucket.kb},
                      {"name": "raster", "views": list(range(1, lay.num_views)),
                       "n": lay.raster[0] * lay.raster[1], "k": bucket.kr,
                       "budget": "all valid" if bucket.method == "none" else
                       ("per crop" if bucket.method in ("fopru", "gridprune") else "whole raster")}],
        }
        # traced with its weights, which are then moved into vision.weights
        return BucketGraph(module, inputs, list(OUTPUTS), record, streamed=False)

    def validation_cases(self, adapter, bucket, graph, text_embeds):
        cases = {}
        for case, (pixels, mask) in validation_cases(adapter, bucket.layout).items():
            cases[case] = {"pixel_values": pixels, "valid_mask": mask}
            if "text_embeds" in graph.inputs:
                cases[case]["text_embeds"] = text_embeds
        return cases

    def manifest_extras(self, manifest, adapter, spec, tmp):
        anyres_manifest(manifest, adapter, spec, tmp)

    def bench_export_options(self, model, image):
        """Only the image's own pinpoint layout is exported and timed (the pinpoints read from config.json)."""
        from vlmprune.models.llava_next.adapter import config_layouts
        from vlmprune.models.llava_next.geometry import layout_for_image
        from vlmprune.models.loading import resolve_path

        layouts = config_layouts(resolve_path(model))
        if not layouts:
            from vlmprune.models import load_model

            layouts = load_model(model).layouts  # a config that does not state them: as the adapter derives them
        w, h = image.size
        first = layouts[0]
        layout = layout_for_image((h, w), [lay.pinpoint for lay in layouts], first.view, first.side)
        self.layout = layout
        return ({"layouts": [layout.name]},
                f"image {w}x{h}: pinpoint {list(layout.pinpoint)}, layout {layout.name} ({layout.num_views} views)")

    def bench_targets(self, rows):
        """LLaVA-NeXT's target: TTFT(keep 1.0) / TTFT(keep 0.25) >= 3 per method."""
        by = {(r["method"], r["keep"]): r for r in rows}
        out = []
        for method in dict.fromkeys(r["method"] for r in rows):
            full, quarter = by.get((method, 1.0)), by.get((method, 0.25))
            if full and quarter:
                value = full["ttft_ms"] / quarter["ttft_ms"]
                out.append({"target": f"TTFT(1.0)/TTFT(0.25) {method}, LLaVA-NeXT {full.get('view', '')}".rstrip(),
                            "goal": f">= {TTFT_SPEEDUP_AT_025:g}", "measured": round(value, 3),
                            "met": bool(value >= TTFT_SPEEDUP_AT_025)})
        return out


TTFT_SPEEDUP_AT_025 = 3.0
