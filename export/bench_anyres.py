"""``prune-bench`` for LLaVA-NeXT (anyres) models: per method and keep ratio, the runtime's stages up to the first
token on the image's own pinpoint layout (the buckets of that layout only are exported), with the same row fields
as the single-view bench so that its tables, plots and targets apply; plus the LLaVA-NeXT target
TTFT(keep 1.0) / TTFT(keep 0.25) >= 3. The peers (ONNX Runtime GenAI, transformers) are not run for anyres models:
the report says so.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from vlmprune import graph_io
from vlmprune.errors import VlmpruneError

TTFT_SPEEDUP_AT_025 = 3.0


def run_anyres_bench(args) -> dict:
    from vlmprune.prune import get_method
    from vlmprune.runtime.anyres_pipeline import AnyresPipeline
    from vlmprune.runtime.profile import PeakMemory, median, timed

    from .bench import SETTLE_S, _bare_decoder_step_ms, _image, evaluate_targets
    from .buckets import parse_list
    from .exporter import ExportRequest, export_bundle
    from .progress import Steps

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        get_method(m)
    keeps = parse_list(args.keep, float, "--keep")
    pruned_keeps = [k for k in keeps if k < 1.0]
    precisions = [p for p in args.decoder_precisions.split(",") if p]
    if args.repeats < 1:
        raise VlmpruneError("--repeats must be at least 1", "e.g. --repeats 3")
    image = _image(args.image)
    steps = Steps()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    precision = precisions[0]  # one decoder precision: the runtime's prefill is what pruning changes
    layout = None
    for method in methods:
        if layout is None:  # the image's layout, from the checkpoint's pinpoints (no export needed)
            from vlmprune.models import load_model

            adapter = load_model(args.model)
            from vlmprune.runtime.anyres import layout_for_image

            w, h = image.size
            layout = layout_for_image((h, w), adapter.preprocessing.grid_pinpoints, adapter.layouts[0].view,
                                      adapter.side)
            steps.log(f"image {w}x{h}: pinpoint {list(layout.pinpoint)}, layout {layout.name} "
                      f"({layout.num_views} views)")
            del adapter
        with steps.step(f"export {method} buckets {pruned_keeps} for layout {layout.name} (decoder {precision})"):
            bundle = export_bundle(ExportRequest(model=args.model, method=method, keeps=pruned_keeps or [1.0],
                                                 layouts=[layout.name], out=out / "bundles" / f"{method}-{precision}",
                                                 force=True, decoder_precision=precision,
                                                 validate=precision in ("fp32", "fp16")), Steps(quiet=True)).path
        pipe = AnyresPipeline(bundle, threads=args.threads)
        steps.log(f"  runtime decoder: {pipe.decoder_kind}, positions {pipe.positions}")
        buckets = sorted(pipe.manifest["vision"]["buckets"], key=lambda b: -b["keep"])
        none_bucket = next(b for b in buckets if b["method"] == "none")
        for b in buckets:
            pipe.prepare(b)
        pixels, size_hw, _ = pipe.anyres(image)
        feeds = {"pixel_values": pixels, "valid_mask": layout.valid_mask(size_hw).astype(np.float32)}
        text_embeds = pipe.text_embeds(args.prompt) if pipe.manifest["text_encoder"] else None

        def vision_call(bucket):
            values = dict(feeds)
            if graph_io.has(bucket["inputs"], "text_embeds"):
                values["text_embeds"] = text_embeds
            f = graph_io.feeds(bucket["inputs"], values, f"bucket {bucket['name']}")
            backend = pipe.vision_backend(bucket)
            return lambda: backend.run(f)

        for bucket in buckets:
            if bucket["method"] == "none" and 1.0 not in keeps:
                continue
            with steps.step(f"{method} {bucket['name']}"):
                a, b = vision_call(none_bucket), vision_call(bucket)
                ta, tb = [], []
                for _ in range(2):
                    a(), b()
                for _ in range(max(5, args.repeats)):  # alternately, so drift cancels
                    ta += timed(a, 1, 0)
                    tb += timed(b, 1, 0)
                ours = []
                with PeakMemory() as mem:
                    for i in range(args.warmup + args.repeats):
                        time.sleep(SETTLE_S)
                        r = pipe.generate(image, args.prompt, bucket=bucket, max_new_tokens=args.new_tokens,
                                          ignore_eos=True)
                        if i >= args.warmup:
                            ours.append(r)
                row = {
                    "method": method, "bucket": bucket["name"], "layout": layout.name, "keep": bucket["keep"],
                    "k": ours[0].visual_tokens_kept, "decoder_precision": precision, "decoder": pipe.decoder_kind,
                    "positions": pipe.positions, "prompt_tokens": ours[0].prompt_tokens,
                    "visual_tokens_total": ours[0].visual_tokens_total,
                    "vision_only_ms": median(ta), "vision_prune_ms": median(tb),
                    "preprocess_ms": median(r.timings.preprocess_ms for r in ours),
                    "text_encoder_ms": median(r.timings.text_encoder_ms for r in ours),
                    "prefill_ms": median(r.timings.prefill_ms for r in ours),
                    "ttft_ms": median(r.timings.ttft_ms for r in ours),
                    "tpot_ms": median(r.timings.tpot_ms for r in ours),
                    "tokens_generated": ours[0].tokens_generated, "peak_rss_mb": mem.peak / 2**20,
                }
                row["bare_decoder_step_ms"] = _bare_decoder_step_ms(pipe, row["prompt_tokens"] + args.new_tokens // 2,
                                                                    args.new_tokens)
                row["prune_overhead"] = row["vision_prune_ms"] / row["vision_only_ms"]
                row["tpot_over_bare_step"] = row["tpot_ms"] / row["bare_decoder_step_ms"]
                row["vision_share_of_ttft"] = row["vision_prune_ms"] / row["ttft_ms"]
                rows.append(row)
                steps.log(f"  {row['k']}/{row['visual_tokens_total']} image tokens: TTFT {row['ttft_ms']:.1f} ms, "
                          f"prefill {row['prefill_ms']:.1f} ms, vision+prune {row['vision_prune_ms']:.1f} ms "
                          f"(x{row['prune_overhead']:.3f} of unpruned), TPOT {row['tpot_ms']:.2f} ms")
    targets = evaluate_targets(rows)
    by = {(r["method"], r["keep"]): r for r in rows}
    for method in methods:
        full, quarter = by.get((method, 1.0)), by.get((method, 0.25))
        if full and quarter:
            value = full["ttft_ms"] / quarter["ttft_ms"]
            targets.append({"target": f"TTFT(1.0)/TTFT(0.25) {method}, LLaVA-NeXT {layout.name}",
                            "goal": f">= {TTFT_SPEEDUP_AT_025:g}", "measured": round(value, 3),
                            "met": bool(value >= TTFT_SPEEDUP_AT_025)})
    skipped = "skipped: not run for LLaVA-NeXT (anyres) models"
    return {
        "model": args.model, "prompt": args.prompt, "repeats": args.repeats, "warmup": args.warmup,
        "new_tokens": args.new_tokens, "decoder_precisions": [precision], "layout": layout.name if layout else None,
        "peers": {"onnxruntime-genai": skipped, "transformers": skipped},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "rows": rows, "targets": targets, "seconds": round(steps.elapsed, 1),
    }
