"""``prune-bench``: what each method and keep ratio buys in time to first token, measured on the runtime, next to
``transformers`` eager ``generate`` on the same weights and the same kept tokens.

Per method and bucket (medians after warm-up): vision-only ms (the unpruned ``none`` graph), vision+prune ms (the
bucket's graph), pruning overhead (their ratio), prefill ms, TTFT, TPOT over N new tokens, the bare decoder step
(session.run alone, same cache length), peak RSS; and the transformers TTFT / TPOT. Writes JSON, a markdown table
and two PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from vlmprune.cli_common import HelpFormatter, main_wrapper, quiet_libraries, require_extra
from vlmprune.errors import VlmpruneError

DEFAULT_PROMPT = "Describe the picture: what objects are there, what colors do they have, and where are they?"
TARGETS = {
    "ttft_speedup_at_0.25": 2.5,  # TTFT(keep 1.0) / TTFT(keep 0.25), fopru and gridprune
    "prune_overhead": {"fopru": 1.03, "gridprune": 1.05, "gprune": 1.10},
    "tpot_over_bare_step": 1.10,
    "speedup_vs_transformers": 1.5,
}


def _parser():
    p = argparse.ArgumentParser(prog="prune-bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="bench-llava", help="preset, folder or cached HF id (default: bench-llava)")
    p.add_argument("--methods", default="fopru,gprune,gridprune", help="comma-separated methods")
    p.add_argument("--keep", default="1.0,0.5,0.25,0.111", help="keep ratios; 1.0 is the unpruned none bucket")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated for TPOT")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about the image (also GridPrune's text)")
    p.add_argument("--image", default="sample", help="image file or 'sample'")
    p.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and torch (default: all cores)")
    p.add_argument("--no-transformers", dest="baseline", action="store_false", help="skip the transformers baseline")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for results.json, results.md, ttft_vs_keep.png, stages.png and the bundles")
    return p


def _image(arg):
    if arg == "sample":
        from vlmprune.sample import make_sample_image

        return make_sample_image()
    from vlmprune.runtime.preprocess import load_image

    return load_image(arg)


def _bare_decoder_step_ms(pipe, cache_len: int, steps: int) -> float:
    """Median time of the decoder session alone for one step with a cache of ``cache_len`` tokens: the same
    I/O-bound ``run_with_iobinding`` the runtime asks for, without the runtime's Python around it (binding setup,
    embedding lookup, sampling, detokenising). The floor the runtime's TPOT is compared with."""
    import onnxruntime as ort

    from vlmprune.runtime.profile import median, timed

    spec = pipe.decoder_spec
    dec = pipe.decoder
    kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, spec["num_kv_heads"], cache_len, spec["head_dim"]), np.float32))
    binding = dec.session.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.zeros((1, 1, spec["hidden_size"]), np.float32))
    binding.bind_cpu_input("attention_mask", np.ones((1, cache_len + 1), np.int64))
    binding.bind_cpu_input("position_ids", np.array([[cache_len]], np.int64))
    for name in dec.past_names:
        binding.bind_ortvalue_input(name, kv)
    binding.bind_output("logits", "cpu")
    for name in dec.present_names:
        binding.bind_output(name, "cpu")
    return median(timed(lambda: dec.session.run_with_iobinding(binding), repeats=steps, warmup=2))


class TransformersBaseline:
    """Eager ``generate`` on the same weights, fed the same kept image features through ``inputs_embeds``."""

    def __init__(self, model: str, threads: int | None):
        import torch

        from vlmprune.models import load_model

        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.adapter = load_model(model, attn_implementation="eager")

    def measure(self, bucket: dict, image, pixels: np.ndarray, ids: list[int], image_token_id: int,
                text_embeds, new_tokens: int, repeats: int) -> dict:
        torch = self.torch
        from vlmprune.prune import get_method

        from .graphs import BucketVisionGraph

        view = self.adapter.vision.views[0]
        module = get_method(bucket["method"]).build(bucket["k"], view.grid, view.has_cls, **bucket["options"])
        graph = BucketVisionGraph(self.adapter, module).eval()
        x = torch.from_numpy(pixels)
        args = (x, torch.from_numpy(text_embeds)) if text_embeds is not None and bucket["method"] != "none" else (x,)
        where = ids.index(image_token_id)
        table = self.adapter.embedding_table()
        model = self.adapter.model

        def vision():
            return graph(*args)[0]

        processor = self.adapter.processor.image_processor

        def first_token():
            # what a transformers user runs: the image processor, the vision tower + pruning, generate
            pv = processor(image, return_tensors="pt")["pixel_values"]
            feats = graph(pv, *args[1:])[0]
            embeds = torch.cat([table[ids[:where]], feats[0], table[ids[where + 1:]]])[None]
            return model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                  max_new_tokens=1, do_sample=False)

        feats = vision()
        embeds = torch.cat([table[ids[:where]], feats[0], table[ids[where + 1:]]])[None]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)

        def full():
            return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens + 1,
                                  min_new_tokens=new_tokens + 1, do_sample=False)

        def prefill_only():
            return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=1, do_sample=False)

        from vlmprune.runtime.profile import median, timed

        ttft = median(timed(first_token, repeats))
        t_full = median(timed(full, repeats))
        t_one = median(timed(prefill_only, repeats))
        return {"ttft_ms": ttft, "tpot_ms": (t_full - t_one) / new_tokens}


def run_bench(args) -> dict:
    from vlmprune.prune import get_method
    from vlmprune.runtime.pipeline import Pipeline
    from vlmprune.runtime.profile import PeakMemory, median, timed

    from .buckets import parse_list
    from .exporter import ExportRequest, export_bundle
    from .progress import Steps

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
    rows = []
    pending = []  # the transformers baseline runs after every runtime measurement: torch's OpenMP threads keep
    # spinning after each call and would slow whatever ONNX Runtime measurement came next
    for method in methods:
        with steps.step(f"export {method} buckets {pruned_keeps}"):
            bundle = export_bundle(
                ExportRequest(model=args.model, method=method, keeps=pruned_keeps or [1.0],
                              out=out / "bundles" / method, force=True),
                Steps(quiet=True),
            ).path
        pipe = Pipeline(bundle, threads=args.threads)
        pixels = pipe.preprocess(image)
        ids = pipe.prompt.encode(args.prompt)
        buckets = sorted(pipe.manifest["vision"]["buckets"], key=lambda b: -b["keep"])
        none_bucket = next(b for b in buckets if b["method"] == "none")
        for b in buckets:
            pipe.prepare(b)
        text_embeds = pipe.text_embeds(args.prompt) if pipe.manifest["text_encoder"] else None

        def vision_call(bucket):
            feeds = {"pixel_values": pixels}
            if any(i["name"] == "text_embeds" for i in bucket["inputs"]):
                feeds["text_embeds"] = text_embeds
            backend = pipe.vision_backend(bucket)
            return lambda: backend.run(feeds)

        def paired_vision_ms(bucket):
            """Medians of the unpruned graph and this bucket's graph, timed alternately so drift cancels."""
            a, b = vision_call(none_bucket), vision_call(bucket)
            ta, tb = [], []
            for _ in range(3):
                a(), b()
            for _ in range(max(20, args.repeats)):
                ta += timed(a, 1, 0)
                tb += timed(b, 1, 0)
            return median(ta), median(tb)

        for bucket in buckets:
            if bucket["method"] == "none" and 1.0 not in keeps:
                continue
            with steps.step(f"{method} {bucket['name']}"):
                vision_only, vision_prune = paired_vision_ms(bucket)
                results = []

                def once():
                    results.append(pipe.generate(image, args.prompt, bucket=bucket, max_new_tokens=args.new_tokens,
                                                 ignore_eos=True))

                with PeakMemory() as mem:
                    timed(once, repeats=args.repeats, warmup=args.warmup)
                measured = results[args.warmup:]
                row = {
                    "method": method,
                    "bucket": bucket["name"],
                    "keep": bucket["keep"],
                    "k": bucket["k"],
                    "prompt_tokens": measured[0].prompt_tokens,
                    "vision_only_ms": vision_only,
                    "vision_prune_ms": vision_prune,
                    "preprocess_ms": median(r.timings.preprocess_ms for r in measured),
                    "text_encoder_ms": median(r.timings.text_encoder_ms for r in measured),
                    "vision_in_run_ms": median(r.timings.vision_ms for r in measured),  # the stage inside TTFT
                    "prefill_ms": median(r.timings.prefill_ms for r in measured),
                    "ttft_ms": median(r.timings.ttft_ms for r in measured),
                    "tpot_ms": median(r.timings.tpot_ms for r in measured),
                    "tokens_generated": measured[0].tokens_generated,
                    # the cache grows from the prompt length by one per token: compare at its mean length
                    "bare_decoder_step_ms": _bare_decoder_step_ms(
                        pipe, measured[0].prompt_tokens + args.new_tokens // 2, args.new_tokens),
                    "peak_rss_mb": mem.peak / 2**20,
                }
                row["prune_overhead"] = row["vision_prune_ms"] / row["vision_only_ms"]
                row["tpot_over_bare_step"] = row["tpot_ms"] / row["bare_decoder_step_ms"]
                rows.append(row)
                pending.append((row, bucket, pixels, ids, pipe.prompt.image_token_id, text_embeds))
                steps.log(f"  TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms, "
                          f"vision+prune {row['vision_prune_ms']:.1f} ms (x{row['prune_overhead']:.3f} of unpruned)")
    if args.baseline:
        with steps.step("load transformers baseline (eager attention)"):
            baseline = TransformersBaseline(args.model, args.threads)
        for row, bucket, pixels, ids, image_token_id, text_embeds in pending:
            with steps.step(f"transformers {row['method']} {row['bucket']}"):
                hf = baseline.measure(bucket, image, pixels, ids, image_token_id, text_embeds, args.new_tokens,
                                      max(1, min(args.repeats, 2)))
            row["transformers_ttft_ms"] = hf["ttft_ms"]
            row["transformers_tpot_ms"] = hf["tpot_ms"]
            row["ttft_speedup_vs_transformers"] = hf["ttft_ms"] / row["ttft_ms"]
            row["tpot_speedup_vs_transformers"] = hf["tpot_ms"] / row["tpot_ms"]
    report = {
        "model": args.model,
        "prompt": args.prompt,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "new_tokens": args.new_tokens,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "targets": evaluate_targets(rows),
        "seconds": round(steps.elapsed, 1),
    }
    return report


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target with the measured figure next to it (from the rows; nothing assumed)."""
    out = []
    by = {(r["method"], r["keep"]): r for r in rows}
    for method in ("fopru", "gridprune"):
        full, quarter = by.get((method, 1.0)), by.get((method, 0.25))
        if full and quarter:
            value = full["ttft_ms"] / quarter["ttft_ms"]
            out.append({"target": f"TTFT(1.0)/TTFT(0.25) {method}", "goal": ">= 2.5", "measured": round(value, 3),
                        "met": value >= TARGETS["ttft_speedup_at_0.25"]})
    for method, limit in TARGETS["prune_overhead"].items():
        pruned = [r for r in rows if r["method"] == method and r["keep"] < 1.0]
        if pruned:
            value = max(r["prune_overhead"] for r in pruned)
            out.append({"target": f"vision+prune / vision-only {method} (worst bucket)", "goal": f"<= {limit}",
                        "measured": round(value, 3), "met": value <= limit})
    if rows:
        value = max(r["tpot_over_bare_step"] for r in rows)
        out.append({"target": "runtime TPOT / bare decoder step (worst)", "goal": "<= 1.10", "measured": round(value, 3),
                    "met": value <= TARGETS["tpot_over_bare_step"]})
    for key, name in (("ttft_speedup_vs_transformers", "TTFT"), ("tpot_speedup_vs_transformers", "TPOT")):
        vals = [r[key] for r in rows if key in r]
        if vals:
            value = min(vals)
            out.append({"target": f"{name} speedup vs transformers eager (worst)", "goal": ">= 1.5",
                        "measured": round(value, 3), "met": value >= TARGETS["speedup_vs_transformers"]})
    return out


def markdown(report: dict) -> str:
    cols = [("method", "method", "{}"), ("keep", "keep", "{}"), ("k", "K", "{}"), ("prompt_tokens", "prompt", "{}"),
            ("vision_only_ms", "vision ms", "{:.1f}"), ("vision_prune_ms", "vision+prune ms", "{:.1f}"),
            ("prune_overhead", "overhead", "{:.3f}"), ("prefill_ms", "prefill ms", "{:.1f}"),
            ("ttft_ms", "TTFT ms", "{:.1f}"), ("tpot_ms", "TPOT ms", "{:.2f}"),
            ("bare_decoder_step_ms", "bare step ms", "{:.2f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
            ("transformers_ttft_ms", "HF TTFT ms", "{:.1f}"), ("transformers_tpot_ms", "HF TPOT ms", "{:.2f}")]
    rows = report["rows"]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    from .bench_plots import plots as draw  # the pictures live in their own module

    return draw(report, out)


@main_wrapper("prune-bench")
def main(argv=None):
    quiet_libraries()
    args = _parser().parse_args(argv)
    require_extra("prune-bench", "export", "torch", "transformers", "onnx", "matplotlib")  # it exports, then plots
    t0 = time.perf_counter()
    report = run_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "results.md").write_text(table)
    pngs = plots(report, args.out)
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {', '.join(str(p) for p in pngs)} "
          f"in {time.perf_counter() - t0:.0f}s")
    return 0
