"""``prune-bench`` for LLaVA-NeXT (anyres) models (``bench_pipeline.py`` runs it): the buckets of the image's own
pinpoint layout only are exported and timed; plus the LLaVA-NeXT target TTFT(keep 1.0) / TTFT(keep 0.25) >= 3.
"""

from __future__ import annotations

import numpy as np

from vlmprune import graph_io

from .bench_pipeline import FamilyBench, run_family_bench

TTFT_SPEEDUP_AT_025 = 3.0


def run_anyres_bench(args) -> dict:
    from vlmprune.models.llava_next import config_layouts
    from vlmprune.models.loading import resolve_path
    from vlmprune.runtime.anyres import layout_for_image
    from vlmprune.runtime.anyres_pipeline import AnyresPipeline

    from .bench import _image
    from .progress import Steps

    image = _image(args.image)
    steps = Steps()
    # the image's layout, from the checkpoint's pinpoints in its config (the weights are read once, by the export)
    layouts = config_layouts(resolve_path(args.model))
    if not layouts:
        from vlmprune.models import load_model

        layouts = load_model(args.model).layouts  # a config that does not state them: as the adapter derives them
    w, h = image.size
    first = layouts[0]
    layout = layout_for_image((h, w), [lay.pinpoint for lay in layouts], first.view, first.side)
    steps.log(f"image {w}x{h}: pinpoint {list(layout.pinpoint)}, layout {layout.name} ({layout.num_views} views)")

    def feeds(pipe, bucket):
        pixels, size_hw, _ = pipe.anyres(image)
        values = {"pixel_values": pixels, "valid_mask": layout.valid_mask(size_hw).astype(np.float32)}
        if graph_io.has(bucket["inputs"], "text_embeds"):
            values["text_embeds"] = pipe.text_embeds(args.prompt)
        return graph_io.feeds(bucket["inputs"], values, f"bucket {bucket['name']}")

    def speedup(rows):
        by = {(r["method"], r["keep"]): r for r in rows}
        out = []
        for method in dict.fromkeys(r["method"] for r in rows):
            full, quarter = by.get((method, 1.0)), by.get((method, 0.25))
            if full and quarter:
                value = full["ttft_ms"] / quarter["ttft_ms"]
                out.append({"target": f"TTFT(1.0)/TTFT(0.25) {method}, LLaVA-NeXT {layout.name}",
                            "goal": f">= {TTFT_SPEEDUP_AT_025:g}", "measured": round(value, 3),
                            "met": bool(value >= TTFT_SPEEDUP_AT_025)})
        return out

    family = FamilyBench(name="LLaVA-NeXT (anyres)", scope=f"layout {layout.name}",
                         open_pipeline=lambda bundle, threads: AnyresPipeline(bundle, threads=threads),
                         feeds=feeds, export_args={"layouts": [layout.name]},
                         row_fields=lambda bucket: {"layout": layout.name},
                         report_fields={"layout": layout.name})
    return run_family_bench(args, family, image, steps, targets_extra=speedup)
