"""``prune-bench`` rows for families that run on their own pipeline (LLaVA-NeXT's anyres, Qwen2.5-VL's M-RoPE): per
method and keep ratio, the torch-free runtime's stages up to the first token, with the row fields of the single-view
bench (``bench.py``) so that its tables, plots and targets apply. A family gives only what differs
(``FamilyBench``): the export's extra arguments, how its pipeline opens, the feeds of a bucket's vision graph and
its own row fields. The peers (ONNX Runtime GenAI, transformers) are not run for these families: the report says so.

The bundles are exported with ``prune-export``'s own code into ``--out/bundles`` and run by ``prune-run``'s
pipelines.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from vlmprune.errors import VlmpruneError


@dataclass
class FamilyBench:
    name: str  # shown in the report's peers line, e.g. "LLaVA-NeXT (anyres)"
    scope: str  # what the export covers, for the progress line, e.g. "layout 2x2"
    open_pipeline: Callable[[Any, int | None], Any]  # (bundle folder, threads) -> pipeline
    feeds: Callable[[Any, dict], dict]  # (pipeline, bucket) -> the bucket graph's feeds, by recorded name
    export_args: dict = field(default_factory=dict)  # extra ExportRequest fields (e.g. layouts)
    row_fields: Callable[[dict], dict] = lambda bucket: {}  # extra row fields of a bucket
    report_fields: dict = field(default_factory=dict)  # extra report fields


def bench_settings(args) -> tuple[list[str], list[float], list[float], str]:
    """The methods, keep ratios, pruned keep ratios and the one decoder precision (pruning changes the prefill)."""
    from vlmprune.prune import get_method

    from .buckets import parse_list

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        get_method(m)
    keeps = parse_list(args.keep, float, "--keep")
    precisions = [p for p in args.decoder_precisions.split(",") if p]
    if args.repeats < 1:
        raise VlmpruneError("--repeats must be at least 1", "e.g. --repeats 3")
    return methods, keeps, [k for k in keeps if k < 1.0], precisions[0] if precisions else "fp32"


def run_family_bench(args, family: FamilyBench, image, steps, targets_extra: Callable[[list], list] | None = None
                     ) -> dict:
    from vlmprune.runtime.profile import PeakMemory, median, timed

    from .bench import SETTLE_S, _bare_decoder_step_ms, evaluate_targets
    from .exporter import ExportRequest, export_bundle
    from .progress import Steps

    methods, keeps, pruned_keeps, precision = bench_settings(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        with steps.step(f"export {method} buckets {pruned_keeps or [1.0]} for {family.scope} (decoder {precision})"):
            bundle = export_bundle(ExportRequest(model=args.model, method=method, keeps=pruned_keeps or [1.0],
                                                 out=out / "bundles" / f"{method}-{precision}", force=True,
                                                 decoder_precision=precision, validate=precision in ("fp32", "fp16"),
                                                 **family.export_args), Steps(quiet=True)).path
        pipe = family.open_pipeline(bundle, args.threads)
        steps.log(f"  runtime decoder: {pipe.decoder_kind}, positions {pipe.positions}")
        buckets = sorted(pipe.manifest["vision"]["buckets"], key=lambda b: -b["keep"])
        none_bucket = next(b for b in buckets if b["method"] == "none")
        for b in buckets:
            pipe.prepare(b)

        def vision_call(bucket):
            feeds, backend = family.feeds(pipe, bucket), pipe.vision_backend(bucket)
            return lambda: backend.run(feeds)

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
                    "method": method, "bucket": bucket["name"], **family.row_fields(bucket), "keep": bucket["keep"],
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
    targets = evaluate_targets(rows) + (targets_extra(rows) if targets_extra else [])
    skipped = f"skipped: not run for {family.name} models"
    return {
        "model": args.model, "prompt": args.prompt, "repeats": args.repeats, "warmup": args.warmup,
        "new_tokens": args.new_tokens, "decoder_precisions": [precision], **family.report_fields,
        "peers": {"onnxruntime-genai": skipped, "transformers": skipped},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "rows": rows, "targets": targets, "seconds": round(steps.elapsed, 1),
    }
