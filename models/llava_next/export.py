"""The LLaVA-NeXT (anyres) path of ``prune-export``: buckets per pinpoint layout and keep ratio, their graphs
(``anyres_graphs.py``) exported and validated like the single-view ones, and the manifest's anyres fields.

``export/exporter.py`` calls in here when the family's recipe has the ``anyres_raster`` layout; everything else
(the decoder, the text encoder, the bundle's sealing) is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.models.llava_next.geometry import Layout, layout_for_image

from vlmprune.models.llava_next.graphs import OUTPUTS, AnyresVisionGraph, check_method, part_budgets
from vlmprune.export.onnx_io import WeightsFile, export_onnx, has_external_data
from vlmprune.export.precision import fp16_vision
from vlmprune.export.progress import Steps
from vlmprune.export.family import FamilyExport
from vlmprune.export.validate import TOLERANCE, Check, _compare, _indices, _session

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


def _check(file: str, case: str, ref: list[np.ndarray], got: list[np.ndarray], precision: str) -> list[Check]:
    tol = TOLERANCE[precision]
    r, o = dict(zip(OUTPUTS, ref)), dict(zip(OUTPUTS, got))
    count = int(r["raster_count"][0])
    checks = [Check(file, case, "raster_count", float(abs(count - int(o["raster_count"][0]))), 0.0,
                    count == int(o["raster_count"][0]))]
    for part in ("base", "raster"):
        n = r[f"{part}_indices"].shape[1] if part == "base" else count
        ri, oi = r[f"{part}_indices"][:, :n], o[f"{part}_indices"][:, :n]
        idx = _indices(file, f"{case} ({part})", ri, oi, tol)
        checks.append(idx)
        if idx.indices_equal:
            checks.append(_compare(file, f"{case} ({part})", f"{part}_embeds", r[f"{part}_embeds"][:, :n],
                                   o[f"{part}_embeds"][:, :n], tol))
    return checks


def export_anyres_vision(req, adapter, buckets: list[AnyresBucket], target, needs_text, text_embeds, tmp: Path,
                         scratch: Path, steps: Steps, checks: list) -> tuple[list[dict], dict]:
    """One graph per (layout, keep) bucket, all sharing ``vision.weights``; each validated as soon as it is written."""
    from vlmprune.export.exporter import _finish_graph, _fold

    records, lint = [], {}
    s = adapter.vision.views[0].image_size
    with WeightsFile(tmp / "vision.weights") as weights:
        for bucket in buckets:
            lay = bucket.layout
            with steps.step(f"export vision graph {bucket.name}"):
                module = AnyresVisionGraph(adapter, lay, bucket.method, bucket.keep, dict(bucket.options)).eval()
                if (module.kb, module.kr) != (bucket.kb, bucket.kr):
                    raise AssertionError(f"{bucket.name}: module returns K={module.kb}+{module.kr}")
                uses_text = bucket.method != "none" and needs_text
                args = (torch.zeros(lay.num_views, 3, *s), torch.ones(*lay.raster))
                names = ["pixel_values", "valid_mask"]
                if uses_text:
                    args, names = (*args, torch.zeros_like(text_embeds)), [*names, "text_embeds"]
                with fp16_vision(adapter) if req.precision == "fp16" else contextlib.nullcontext():
                    model = export_onnx(module, args, scratch / bucket.file, input_names=names,
                                        output_names=OUTPUTS, opset=target.opset)
                if not has_external_data(model):
                    model = _fold(model)
                weights.add_model(model, scratch)
                inputs, outputs = _finish_graph(model, bucket.file, tmp, scratch, weights, target, lint)
                del model
            records.append({
                "name": bucket.name, "method": bucket.method, "keep": bucket.keep, "k": bucket.k,
                "options": dict(bucket.options), "file": bucket.file, "inputs": inputs, "outputs": outputs,
                "layout": lay.name, "num_views": lay.num_views,
                # K per part: the base view's is exact; the raster's is the slot count, its budget per image is
                # round(keep * valid tokens) (per crop for FoPru), returned as raster_count
                "parts": [{"name": "base", "views": [0], "n": lay.side * lay.side, "k": bucket.kb},
                          {"name": "raster", "views": list(range(1, lay.num_views)),
                           "n": lay.raster[0] * lay.raster[1], "k": bucket.kr,
                           "budget": "all valid" if bucket.method == "none" else
                           ("per crop" if bucket.method in ("fopru", "gridprune") else "whole raster")}],
            })
            if req.validate:
                with steps.step(f"validate {bucket.file}"):
                    sess = _session(tmp / bucket.file)
                    for case, (pixels, mask) in validation_cases(adapter, lay).items():
                        with torch.no_grad(), (fp16_vision(adapter) if req.precision == "fp16"
                                               else contextlib.nullcontext()):
                            extra = (text_embeds,) if uses_text else ()
                            ref = [t.numpy() for t in module(pixels, mask, *extra)]
                        feeds = {"pixel_values": pixels.numpy(), "valid_mask": mask.numpy()}
                        if uses_text:
                            feeds["text_embeds"] = text_embeds.numpy()
                        got = sess.run(OUTPUTS, feeds)
                        checks += _check(bucket.file, case, ref, got, req.precision)
    return records, lint


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

    def export_vision(self, req, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps, checks):
        return export_anyres_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps,
                                    checks)

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
