"""``prune-bench`` rows for Qwen2.5-VL: per method and keep ratio, the torch-free Qwen runtime's stages up to the
first token at the default 448 x 448 bucket, with the row fields of the single-view bench so that its tables, plots
and targets apply. The peers (ONNX Runtime GenAI, transformers) are not run for Qwen2.5-VL: the report says so.

The export folders are written into a temporary folder inside ``--out`` and removed afterwards (the bench made
them); the rows are the measurement.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import numpy as np

from vlmprune.errors import VlmpruneError


def bare_decoder_step_ms(pipe, cache_len: int, steps: int) -> float:
    """Median time of the decoder session alone for one step with a cache of ``cache_len`` tokens (the floor the
    runtime's TPOT is compared with)."""
    from vlmprune.runtime.profile import median, timed

    dec = pipe.decoder
    kv = np.zeros((1, dec.kv[1], cache_len, dec.kv[3]), np.float32)
    feeds = {"inputs_embeds": np.zeros((1, 1, pipe.spec["decoder"]["hidden_size"]), np.float32),
             "attention_mask": np.ones((1, cache_len + 1), np.int64),
             "position_ids": np.full((3, 1, 1), cache_len, np.int64), **{n: kv for n in dec.past_names}}
    return median(timed(lambda: dec.session.run(dec.outputs, feeds), repeats=steps, warmup=2))


def run_qwen_bench(args) -> dict:
    from vlmprune.prune import get_method
    from vlmprune.runtime.profile import PeakMemory, median, timed
    from vlmprune.runtime.qwen_pipeline import QwenPipeline

    from .bench import SETTLE_S, _image, evaluate_targets
    from .buckets import parse_list
    from .progress import Steps
    from .qwen_export import export_qwen_folder

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        get_method(m)
    keeps = parse_list(args.keep, float, "--keep")
    pruned_keeps = [k for k in keeps if k < 1.0]
    if args.repeats < 1:
        raise VlmpruneError("--repeats must be at least 1", "e.g. --repeats 3")
    image = _image(args.image)
    steps = Steps()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".qwen-bench-", dir=out)
    rows = []
    try:
        for method in methods:
            folder = os.path.join(work, method)
            with steps.step(f"export {method} buckets {pruned_keeps or [1.0]} (448x448, decoder fp32)"):
                export_qwen_folder(args.model, folder, method, keeps=pruned_keeps or [1.0], steps=Steps(quiet=True))
            pipe = QwenPipeline(folder, threads=args.threads)
            buckets = sorted(pipe.spec["buckets"], key=lambda b: -b["keep"])
            none_bucket = next(b for b in buckets if b["method"] == "none")
            pixels = None

            def vision_call(bucket):
                nonlocal pixels
                from vlmprune.runtime.qwen_preprocess import QwenPreprocessor

                pixels = QwenPreprocessor({**pipe.spec["preprocessing"], "crop_size": bucket["image_size"]})(image)
                return lambda: pipe.vision(pixels, bucket, image, args.prompt)

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
                            r = pipe.generate(image, args.prompt, bucket["name"], max_new_tokens=args.new_tokens,
                                              ignore_eos=True)
                            if i >= args.warmup:
                                ours.append(r)
                    t = [r.timings for r in ours]
                    row = {
                        "method": method, "bucket": bucket["name"], "keep": bucket["keep"], "k": bucket["k"],
                        "image_size": bucket["image_size"], "decoder_precision": "fp32", "decoder": "plain",
                        "positions": bucket.get("positions", "original"), "prompt_tokens": ours[0].prompt_length,
                        "visual_tokens_total": none_bucket["k"],
                        "vision_only_ms": median(ta), "vision_prune_ms": median(tb),
                        **{key: median(x[key] for x in t) for key in ("preprocess_ms", "text_encoder_ms",
                                                                      "prefill_ms", "ttft_ms", "tpot_ms")},
                        "tokens_generated": len(ours[0].tokens), "peak_rss_mb": mem.peak / 2**20,
                    }
                    row["bare_decoder_step_ms"] = bare_decoder_step_ms(
                        pipe, row["prompt_tokens"] + args.new_tokens // 2, args.new_tokens)
                    row["prune_overhead"] = row["vision_prune_ms"] / row["vision_only_ms"]
                    row["tpot_over_bare_step"] = row["tpot_ms"] / row["bare_decoder_step_ms"]
                    row["vision_share_of_ttft"] = row["vision_prune_ms"] / row["ttft_ms"]
                    rows.append(row)
                    steps.log(f"  {row['k']}/{row['visual_tokens_total']} image tokens: TTFT {row['ttft_ms']:.1f} ms, "
                              f"prefill {row['prefill_ms']:.1f} ms, vision+prune {row['vision_prune_ms']:.1f} ms "
                              f"(x{row['prune_overhead']:.3f} of unpruned), TPOT {row['tpot_ms']:.2f} ms")
            pipe = None  # the next method's sessions replace these
    finally:
        shutil.rmtree(work, ignore_errors=True)
    skipped = "skipped: not run for Qwen2.5-VL models"
    return {
        "model": args.model, "prompt": args.prompt, "repeats": args.repeats, "warmup": args.warmup,
        "new_tokens": args.new_tokens, "decoder_precisions": ["fp32"], "image_size": [448, 448],
        "peers": {"onnxruntime-genai": skipped, "transformers": skipped},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "rows": rows, "targets": evaluate_targets(rows), "seconds": round(steps.elapsed, 1),
    }
