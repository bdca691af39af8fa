"""``prune-bench``: what each method and keep ratio buys in time to first token, measured on the runtime, next to
its peers on the same weights, measured in the same run and interleaved run by run: ONNX Runtime GenAI (its model
builder's model and generation loop, at the same decoder precision) and ``transformers`` eager ``generate``.

Per method, bucket and decoder precision (medians after warm-up): vision-only ms (the unpruned ``none`` graph),
vision+prune ms (the bucket's graph), pruning overhead (their ratio), prefill ms, TTFT, TPOT over N new tokens, the
bare decoder step (the decoder session alone, same cache length), peak RSS; the peers' prefill, TTFT and TPOT and
the ratios against them. Every per-token figure is a difference of two timestamps of one run (non-negative by
construction); medians are taken over runs. Writes JSON, markdown tables and two PNG plots.
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
    "tpot_over_bare_step": 1.05,
    "tpot_vs_ortgenai": 1.0,  # runtime TPOT / ONNX Runtime GenAI TPOT at the same decoder precision
    "prefill_vs_ortgenai": 1.05,
    "int4_tpot_over_fp32": 0.35,
    "ttft_speedup_vs_transformers": 1.3,
    "tpot_speedup_vs_transformers": 1.5,
}
# Vision graphs are timed apart from the runs, alternately with the unpruned one: this many untimed pairs first,
# then at least this many timed pairs (every family alike).
VISION_WARMUP, VISION_RUNS = 3, 20
SETTLE_S = 0.05  # pause before a run on another engine: torch's and ORT GenAI's threads spin a while after a call


def _parser():
    p = argparse.ArgumentParser(prog="prune-bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="bench-llava", help="preset, folder or cached HF id (default: bench-llava)")
    p.add_argument("--methods", default="fopru,gprune,gridprune", help="comma-separated methods")
    p.add_argument("--keep", default="1.0,0.5,0.25,0.111", help="keep ratios; 1.0 is the unpruned none bucket")
    p.add_argument("--decoder-precisions", default="fp32,int4",
                   help="decoder precisions: every method at the first, the first method at the others (default: "
                        "fp32,int4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated for TPOT")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about the image (also GridPrune's text)")
    p.add_argument("--image", default="sample", help="image file or 'sample'")
    p.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and torch (default: all cores)")
    p.add_argument("--no-transformers", dest="baseline", action="store_false", help="skip the transformers peer")
    p.add_argument("--no-ortgenai", dest="ortgenai", action="store_false", help="skip the ONNX Runtime GenAI peer")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for results.json, results.md, ttft_vs_keep.png, stages.png and the bundles")
    return p


def _image(arg):
    if arg == "sample":
        from vlmprune.sample import make_sample_image

        return make_sample_image()
    from vlmprune.runtime.preprocess import load_image

    return load_image(arg)


def _per_step_ms(step, steps: int, runs: int = 5) -> float:
    """The statistic TPOT is: the mean time of ``steps`` back-to-back steps in one run, median over ``runs`` runs
    (a median of single calls would drop the occasional slow step that every run's mean includes)."""
    from vlmprune.runtime.profile import median

    step(), step()
    means = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        means.append((time.perf_counter() - t0) * 1e3 / steps)
    return median(means)


def _bare_decoder_step_ms(pipe, cache_len: int, steps: int) -> float:
    """Time of the decoder session alone for one step with a cache of ``cache_len`` tokens: the same I/O-bound
    ``run_with_iobinding`` the runtime asks for, without the runtime's Python around it (binding setup, embedding
    lookup, sampling, detokenising). The floor the runtime's TPOT is compared with, as the same statistic."""
    import onnxruntime as ort

    spec = pipe.decoder_spec
    dec = pipe.decoder
    if getattr(dec, "kind", "plain") == "fused":  # its own preallocated buffers, bound once
        embeds = np.zeros((1, 1, spec["hidden_size"]), dec.embeds_dtype)
        dec.bind(embeds, cache_len)
        ms = _per_step_ms(lambda: dec.session.run_with_iobinding(dec.binding), steps)
        dec.reset()
        return ms
    kv_dtype = getattr(dec, "kv_dtype", np.dtype(np.float32))
    kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, spec["num_kv_heads"], cache_len, spec["head_dim"]), kv_dtype))
    binding = dec.session.io_binding()
    io, types = dec.io, dec.backend.inputs  # the manifest's names, the session's dtypes
    binding.bind_cpu_input(io.inputs_embeds, np.zeros((1, 1, spec["hidden_size"]), types[io.inputs_embeds]))
    binding.bind_cpu_input(io.attention_mask, np.ones((1, cache_len + 1), types[io.attention_mask]))
    # [1, 1], or [3, 1, 1] for an M-RoPE decoder (the shape the runtime's decoder steps with)
    binding.bind_cpu_input(io.position_ids, np.full(dec.step_position.shape, cache_len, types[io.position_ids]))
    for name in dec.past_names:
        binding.bind_ortvalue_input(name, kv)
    for kind, name in getattr(dec, "prefill_names", {}).items():  # DeepStack: empty at a generated token
        binding.bind_cpu_input(name, dec.prefill_empty[kind])
    binding.bind_output(io.logits, "cpu")
    for name in dec.present_names:
        binding.bind_output(name, "cpu")
    return _per_step_ms(lambda: dec.session.run_with_iobinding(binding), steps)


def run_bench(args) -> dict:
    from vlmprune.prune import get_method
    from vlmprune.runtime.pipeline import open_bundle
    from vlmprune.runtime.profile import PeakMemory, median, timed

    from .bench_peers import OrtGenaiPeer, TransformersPeer, ortgenai_available
    from .buckets import parse_list
    from .exporter import DECODER_PRECISIONS, ExportRequest, export_bundle
    from .progress import Steps

    from vlmprune.models.loading import model_family

    family = model_family(args.model)
    hooks = family.export_hooks()  # what this family's bench exports, and its own targets
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        get_method(m)
    keeps = parse_list(args.keep, float, "--keep")
    pruned_keeps = [k for k in keeps if k < 1.0]
    precisions = [p for p in args.decoder_precisions.split(",") if p]
    for p in precisions:
        if p not in DECODER_PRECISIONS:
            raise VlmpruneError(f"unknown decoder precision {p!r}", f"use {','.join(DECODER_PRECISIONS)}")
    if args.repeats < 1:
        raise VlmpruneError("--repeats must be at least 1", "e.g. --repeats 3")
    image = _image(args.image)
    steps = Steps()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    skipped = {}
    export_options, scope = hooks.bench_export_options(args.model, image)
    if scope:
        steps.log(scope)
    if not family.bench_peers:  # the peers are built for this family's decoder and prompt layout only where declared
        precisions = precisions[:1]
        args.baseline, args.ortgenai = False, False
        for peer in ("onnxruntime-genai", "transformers"):
            skipped[peer] = f"not run for {family.name} models"

    hf = None
    if args.baseline:
        with steps.step("load transformers peer (eager attention)"):
            hf = TransformersPeer(args.model, args.threads)
    og_peers: dict[str, OrtGenaiPeer] = {}
    reason = skipped.get("onnxruntime-genai") or (ortgenai_available() if args.ortgenai else "--no-ortgenai")
    if reason:
        skipped["onnxruntime-genai"] = reason
        steps.log(f"ONNX Runtime GenAI peer skipped: {reason}")
    else:
        from vlmprune.models import load_model

        source = hf.adapter if hf is not None else load_model(args.model)
        for p in precisions:
            with steps.step(f"build ONNX Runtime GenAI peer ({p}, its model builder on the same weights)"):
                og_peers[p] = OrtGenaiPeer(source, p, out / "ortgenai" / p, args.threads)

    def settle():
        time.sleep(SETTLE_S)

    for precision in precisions:
        for method in methods if precision == precisions[0] else methods[:1]:
            with steps.step(f"export {method} buckets {pruned_keeps} (decoder {precision})"):
                bundle = export_bundle(
                    ExportRequest(model=args.model, method=method, keeps=pruned_keeps or [1.0],
                                  out=out / "bundles" / f"{method}-{precision}", force=True,
                                  decoder_precision=precision,
                                  # the validation floors are the exporter's; a speed run at a quantised precision
                                  # does not need them (its bundle is validated by prune-export and the tests)
                                  validate=precision in ("fp32", "fp16"), family_options=export_options),
                    Steps(quiet=True),
                ).path
            pipe = open_bundle(bundle, threads=args.threads)
            steps.log(f"  runtime decoder: {pipe.decoder_kind}, positions {pipe.positions}" +
                      (f" ({pipe.decoder_note})" if pipe.decoder_note else ""))
            ids = pipe.prompt.encode(args.prompt)
            buckets = sorted(pipe.family.buckets_for(image), key=lambda b: -b["keep"])
            none_bucket = next(b for b in buckets if b["method"] == "none")
            for b in buckets:
                pipe.prepare(b)
            text_embeds = pipe.text_embeds(args.prompt) if pipe.manifest["text_encoder"] else None

            def vision_call(bucket):
                feeds = pipe.vision_feeds(pipe.family.prepare(image, bucket), bucket, args.prompt)
                backend = pipe.vision_backend(bucket)
                return lambda: backend.run(feeds)

            def paired_vision_ms(bucket):
                """Medians of the unpruned graph and this bucket's graph, timed alternately so drift cancels (the
                same counts for every family)."""
                a, b = vision_call(none_bucket), vision_call(bucket)
                ta, tb = [], []
                for _ in range(VISION_WARMUP):
                    a(), b()
                for _ in range(max(VISION_RUNS, args.repeats)):
                    ta += timed(a, 1, 0)
                    tb += timed(b, 1, 0)
                return median(ta), median(tb)

            for bucket in buckets:
                if bucket["method"] == "none" and 1.0 not in keeps:
                    continue
                with steps.step(f"{method} {bucket['name']} (decoder {precision})"):
                    vision_only, vision_prune = paired_vision_ms(bucket)
                    og = og_peers.get(precision)
                    og_ids = og.prompt_ids(ids, pipe.prompt.image_token_id, bucket["k"]) if og else None
                    hf_run = (hf.prepare(bucket, image, ids, pipe.prompt.image_token_id, text_embeds)
                              if hf is not None and precision == "fp32" else None)
                    ours, theirs, eager = [], [], []
                    with PeakMemory() as mem:
                        for i in range(args.warmup + args.repeats):  # interleaved: drift hits every engine alike
                            settle()
                            r = pipe.generate(image, args.prompt, bucket=bucket, max_new_tokens=args.new_tokens,
                                              ignore_eos=True)
                            if og is not None:
                                settle()
                                g = og.measure(og_ids, args.new_tokens)
                            if hf_run is not None:
                                settle()
                                h = hf_run(args.new_tokens)
                            if i >= args.warmup:
                                ours.append(r)
                                if og is not None:
                                    theirs.append(g)
                                if hf_run is not None:
                                    eager.append(h)
                    row = {
                        "method": method,
                        "bucket": bucket["name"],
                        **({"view": ours[0].view} if ours[0].view else {}),
                        "keep": bucket["keep"],
                        "k": ours[0].visual_tokens_kept,
                        "visual_tokens_total": ours[0].visual_tokens_total,
                        "decoder_precision": precision,
                        "decoder": pipe.decoder_kind,
                        "positions": pipe.positions,
                        "prompt_tokens": ours[0].prompt_tokens,
                        "vision_only_ms": vision_only,
                        "vision_prune_ms": vision_prune,
                        "preprocess_ms": median(r.timings.preprocess_ms for r in ours),
                        "text_encoder_ms": median(r.timings.text_encoder_ms for r in ours),
                        "vision_in_run_ms": median(r.timings.vision_ms for r in ours),  # the stage inside TTFT
                        "prefill_ms": median(r.timings.prefill_ms for r in ours),
                        "ttft_ms": median(r.timings.ttft_ms for r in ours),
                        "tpot_ms": median(r.timings.tpot_ms for r in ours),
                        "tokens_generated": ours[0].tokens_generated,
                        "peak_rss_mb": mem.peak / 2**20,
                    }
                    # the cache grows from the prompt length by one per token: compare at its mean length
                    row["bare_decoder_step_ms"] = _bare_decoder_step_ms(
                        pipe, row["prompt_tokens"] + args.new_tokens // 2, args.new_tokens)
                    row["prune_overhead"] = row["vision_prune_ms"] / row["vision_only_ms"]
                    row["tpot_over_bare_step"] = row["tpot_ms"] / row["bare_decoder_step_ms"]
                    row["vision_share_of_ttft"] = row["vision_prune_ms"] / row["ttft_ms"]
                    if theirs:
                        row["ortgenai_prefill_ms"] = median(g["prefill_ms"] for g in theirs)
                        row["ortgenai_first_token_ms"] = median(g["first_token_ms"] for g in theirs)
                        row["ortgenai_tpot_ms"] = median(g["tpot_ms"] for g in theirs)
                        row["prefill_vs_ortgenai"] = row["prefill_ms"] / row["ortgenai_prefill_ms"]
                        row["tpot_vs_ortgenai"] = row["tpot_ms"] / row["ortgenai_tpot_ms"]
                        # ONNX Runtime GenAI has no vision stage: its TTFT is this pipeline's with its decoder in
                        # place of ours (our stages up to the prefill, then its prompt-to-first-token time)
                        row["ttft_vs_ortgenai"] = row["ttft_ms"] / (row["ttft_ms"] - row["prefill_ms"]
                                                                    + row["ortgenai_first_token_ms"])
                    if eager:
                        row["transformers_prefill_ms"] = median(h["prefill_ms"] for h in eager)
                        row["transformers_ttft_ms"] = median(h["ttft_ms"] for h in eager)
                        row["transformers_tpot_ms"] = median(h["tpot_ms"] for h in eager)
                        row["prefill_speedup_vs_transformers"] = row["transformers_prefill_ms"] / row["prefill_ms"]
                        row["ttft_speedup_vs_transformers"] = row["transformers_ttft_ms"] / row["ttft_ms"]
                        row["tpot_speedup_vs_transformers"] = row["transformers_tpot_ms"] / row["tpot_ms"]
                    rows.append(row)
                    extra = (f", ORT GenAI TPOT {row['ortgenai_tpot_ms']:.2f} ms" if theirs else "") + (
                        f", HF TTFT {row['transformers_ttft_ms']:.1f} ms" if eager else "")
                    steps.log(f"  TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms, "
                              f"vision+prune {row['vision_prune_ms']:.1f} ms (x{row['prune_overhead']:.3f} of "
                              f"unpruned){extra}")
    report = {
        "model": args.model,
        "prompt": args.prompt,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "new_tokens": args.new_tokens,
        "decoder_precisions": precisions,
        "peers": {"onnxruntime-genai": "skipped: " + skipped["onnxruntime-genai"] if "onnxruntime-genai" in skipped
                  else f"onnxruntime-genai {_version('onnxruntime_genai')}, its model builder on the same weights",
                  "transformers": "eager generate, fp32" if hf is not None else
                  "skipped: " + skipped.get("transformers", "--no-transformers")},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "rows": rows,
        "targets": evaluate_targets(rows) + hooks.bench_targets(rows),
        "seconds": round(steps.elapsed, 1),
    }
    return report


def _version(module: str) -> str:
    try:
        return getattr(__import__(module), "__version__", "?")
    except ImportError:
        return "not installed"


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target with the measured figure next to it (from the rows; nothing assumed). Worst row per target."""
    out = []

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "measured": round(value, 3), "met": bool(met)})

    precisions = list(dict.fromkeys(r.get("decoder_precision", "fp32") for r in rows))
    first = [r for r in rows if r.get("decoder_precision", "fp32") == (precisions[0] if precisions else "fp32")]
    by = {(r["method"], r["keep"]): r for r in first}
    for method in ("fopru", "gridprune"):
        full, quarter = by.get((method, 1.0)), by.get((method, 0.25))
        if full and quarter:
            value = full["ttft_ms"] / quarter["ttft_ms"]
            add(f"TTFT(1.0)/TTFT(0.25) {method}", ">= 2.5", value, value >= TARGETS["ttft_speedup_at_0.25"])
    for method, limit in TARGETS["prune_overhead"].items():
        pruned = [r for r in first if r["method"] == method and r["keep"] < 1.0]
        if pruned:
            value = max(r["prune_overhead"] for r in pruned)
            add(f"vision+prune / vision-only {method} (worst bucket)", f"<= {limit}", value, value <= limit)
    if rows:
        value = max(r["tpot_over_bare_step"] for r in rows)
        limit = TARGETS["tpot_over_bare_step"]
        add("runtime TPOT / bare decoder step (worst)", f"<= {limit}", value, value <= limit)
    for p in precisions:
        at = [r for r in rows if r.get("decoder_precision", "fp32") == p]
        for key, label in (("tpot_vs_ortgenai", "TPOT"), ("prefill_vs_ortgenai", "prefill")):
            vals = [r[key] for r in at if key in r]
            if vals:
                limit = TARGETS[key]
                add(f"runtime {label} / ONNX Runtime GenAI {label}, {p} (worst)", f"<= {limit}", max(vals),
                    max(vals) <= limit)
    fp32 = {(r["method"], r["keep"]): r for r in rows if r.get("decoder_precision", "fp32") == "fp32"}
    pairs = [(r, fp32[(r["method"], r["keep"])]) for r in rows
             if r.get("decoder_precision") == "int4" and (r["method"], r["keep"]) in fp32]
    if pairs:
        value = max(a["tpot_ms"] / b["tpot_ms"] for a, b in pairs)
        limit = TARGETS["int4_tpot_over_fp32"]
        add("int4 TPOT / fp32 TPOT (worst)", f"<= {limit}", value, value <= limit)
    for key, name in (("ttft_speedup_vs_transformers", "TTFT"), ("tpot_speedup_vs_transformers", "TPOT")):
        vals = [r[key] for r in rows if key in r]
        if vals:
            add(f"{name} speedup vs transformers eager (worst)", f">= {TARGETS[key]}", min(vals),
                min(vals) >= TARGETS[key])
    return out


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |")
    return lines


def markdown(report: dict) -> str:
    rows = [{**r, "decoder_label": f"{r.get('decoder', 'plain')} {r.get('decoder_precision', 'fp32')}"}
            for r in report["rows"]]
    main = [("method", "method", "{}"), ("keep", "keep", "{}"), ("k", "K", "{}"), ("decoder_label", "decoder", "{}"),
            ("prompt_tokens", "prompt", "{}"), ("vision_only_ms", "vision ms", "{:.1f}"),
            ("vision_prune_ms", "vision+prune ms", "{:.1f}"), ("prune_overhead", "overhead", "{:.3f}"),
            ("prefill_ms", "prefill ms", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.1f}"), ("tpot_ms", "TPOT ms", "{:.2f}"),
            ("bare_decoder_step_ms", "bare step ms", "{:.2f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]
    peers = [("method", "method", "{}"), ("keep", "keep", "{}"), ("decoder_label", "decoder", "{}"),
             ("prefill_ms", "prefill ms", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.1f}"), ("tpot_ms", "TPOT ms", "{:.2f}"),
             ("ortgenai_prefill_ms", "ORT GenAI prefill ms", "{:.1f}"),
             ("ortgenai_tpot_ms", "ORT GenAI TPOT ms", "{:.2f}"), ("prefill_vs_ortgenai", "prefill / ORT GenAI", "{:.2f}"),
             ("ttft_vs_ortgenai", "TTFT / ORT GenAI", "{:.2f}"),
             ("tpot_vs_ortgenai", "TPOT / ORT GenAI", "{:.2f}"), ("transformers_prefill_ms", "HF prefill ms", "{:.1f}"),
             ("transformers_ttft_ms", "HF TTFT ms", "{:.1f}"), ("transformers_tpot_ms", "HF TPOT ms", "{:.2f}"),
             ("prefill_speedup_vs_transformers", "HF prefill / ours", "{:.2f}"),
             ("ttft_speedup_vs_transformers", "HF TTFT / ours", "{:.2f}"),
             ("tpot_speedup_vs_transformers", "HF TPOT / ours", "{:.2f}")]
    lines = _table(rows, main)
    if any("ortgenai_tpot_ms" in r or "transformers_tpot_ms" in r for r in rows):
        lines += ["", "Peers on the same weights, interleaved run by run (ratios: ours over ORT GenAI, HF over ours):",
                  "", *_table(rows, peers)]
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    for name, what in report.get("peers", {}).items():
        if what.startswith("skipped"):
            lines.append(f"\n{name}: {what}")
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
