"""``prune-eval``: what each keep ratio costs in answer quality, on the user's own data.

Runs every item through every selected bucket of each bundle with greedy decoding and reports, per bucket: exact
match and VQA soft accuracy when the data has reference answers; always, agreement with the unpruned bucket of the
same bundle (identical answer, first token, token F1, common prefix); and the median time to first token. Writes
``results.jsonl`` (one line per answer, appended as it goes, so rerunning the command resumes), ``summary.json``,
``summary.md`` and ``pareto.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from vlmprune.cli_common import add_session_args, main_wrapper, quiet_libraries
from vlmprune.errors import VlmpruneError

from .eval_metrics import VQA_CONVENTIONS

DATA_HELP = """data formats:
  LLaVA eval JSONL   one object per line: question_id, image (relative to --images, default the file's
                     folder), text, and optionally answer (string) or answers (list)
  VQAv2 pair         --data questions.json (questions: question_id, image_id, question) and
                     --annotations annotations.json (annotations: question_id, answers); images named
                     COCO_<subtype>_<id:012d>.jpg, <id:012d>.jpg or <id>.jpg in --images
  image folder       --data DIR of images and one prompt (--prompt-file, or DIR's only .txt file); no labels
a bad line, a missing or unreadable image is reported in one line, counted as skipped, and the run goes on."""


VQA_NOTE = {
    "lmms-eval": "VQA soft accuracy as lmms-eval's VQAv2 task scores it (vqav2_process_results): both sides "
                 "normalised, min(1, matches among the other references / 3) averaged over leaving each out",
    "vqaeval": "VQA soft accuracy as the official vqaEval.py scores it: normalised only when the references "
               "disagree, min(1, matches among the other references / 3) averaged over leaving each out",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune-eval", description=__doc__.replace("``", "").strip(),
                                epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE", help="bundle folder(s) written by prune-export")
    p.add_argument("--data", type=Path, required=True, metavar="PATH",
                   help="LLaVA .jsonl, VQAv2 questions .json, or image folder")
    p.add_argument("--annotations", type=Path, metavar="JSON", help="VQAv2 annotations JSON (reference answers)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="image folder for .jsonl / .json data (default: the data file's folder)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read images that resolve outside the image folder (absolute paths, '..', symbolic links "
                        "leading out); refused by default")
    p.add_argument("--prompt-file", type=Path, metavar="TXT", help="the prompt for a folder of images")
    p.add_argument("--prompt-suffix", metavar="TEXT",
                   help="a line appended to every prompt, e.g. 'Answer the question using a single word or phrase.'")
    p.add_argument("--keep", nargs="+", metavar="R",
                   help="keep ratio(s) to evaluate (default: every pruned bucket); the unpruned bucket always runs "
                        "as the reference")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="greedy answer length cap (default 32)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N items only")
    add_session_args(p, decoder=False)
    p.add_argument("--vqa-convention", default="lmms-eval", choices=VQA_CONVENTIONS,
                   help="VQA accuracy as lmms-eval's VQAv2 task scores it (the papers' tables use it) or as the "
                        "official vqaEval.py does (vqaeval: normalises only when the references disagree; "
                        "default: lmms-eval)")
    p.add_argument("--plain-progress", action="store_true", help="progress as plain lines even if tqdm is installed")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder, prune-eval's own (marked by a .prune-eval file): new, empty, or written by an "
                        "earlier prune-eval (rerun with the same one to resume)")
    return p


def _keeps(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    out = []
    for v in ",".join(values).split(","):
        if not v.strip():
            continue
        try:
            keep = float(v)
        except ValueError:
            raise VlmpruneError(f"--keep {v!r} is not a number", "give fractions such as --keep 0.25 0.5") from None
        if not 0 < keep <= 1:
            raise VlmpruneError(f"keep ratio {keep} is outside (0, 1]", "give fractions such as --keep 0.25 0.5")
        out.append(keep)
    return out


def evaluate(args: argparse.Namespace, stream=None) -> dict:
    """Read the data, answer what is missing, summarise; returns the report written to ``summary.json``."""
    from .eval_data import load_dataset
    from .eval_out import claim_out
    from .eval_report import markdown, plot, summarise, write_text
    from .eval_run import RESULTS, plan_bundles, run_eval

    stream = stream or sys.stderr
    t0 = time.perf_counter()
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    plans = plan_bundles(args.bundles, _keeps(args.keep), say)
    # --out is claimed before anything is read or computed; an image folder being read must not hold it
    claim_out(args.out, scanned=args.data if args.data.is_dir() else None)
    ds = load_dataset(args.data, annotations=args.annotations, images=args.images, prompt_file=args.prompt_file,
                      prompt_suffix=args.prompt_suffix, limit=args.limit,
                      allow_outside_images=args.allow_outside_images)
    for s in ds.skipped:
        say(f"prune-eval: skipped {s['where']}: {s['reason']}")
    labelled = sum(1 for i in ds.items if i.answers)
    single = sum(1 for i in ds.items if len(i.answers) == 1)
    if single:
        say(f"prune-eval: {single} item(s) have a single reference answer; VQA accuracy scores them 0 (it counts "
            "agreement with the other annotators, as both reference scripts do); read exact match for them")
    say(f"prune-eval: {len(ds.items)} items ({ds.kind}, {labelled} with reference answers), {len(ds.skipped)} "
        f"skipped; {len(plans)} bundle(s), buckets: "
        + "; ".join(f"{p.label}: {', '.join(b['name'] for b in p.buckets)}" for p in plans))
    try:
        outcome = run_eval(plans, ds, args.out, max_new_tokens=args.max_new_tokens, engines=args.engines,
                           positions=args.positions, provider=args.provider, threads=args.threads,
                           plain_progress=args.plain_progress, stream=stream)
    except KeyboardInterrupt:
        say(f"prune-eval: answers so far are kept in {args.out / RESULTS}; rerun the same command to resume")
        raise
    skipped = ds.skipped + outcome.skipped
    if not outcome.computed and not outcome.reused:  # a summary of nothing is not a result
        first = f"; first: {skipped[0]['where']}: {skipped[0]['reason']}" if skipped else ""
        raise VlmpruneError(f"nothing was evaluated: {len(skipped)} item(s) skipped{first}",
                            "fix what the skipped lines above say and rerun (answers already made are kept)")
    report = {
        "bundles": [{"label": p.label, "path": str(p.folder), "bundle_id": p.bundle_id, "method": p.method,
                     "buckets": [b["name"] for b in p.buckets]} for p in plans],
        "dataset": {"kind": ds.kind, "source": ds.source, "items": len(ds.items), "labelled": labelled,
                    "skipped": len(skipped), "skipped_items": skipped},
        "settings": {"max_new_tokens": args.max_new_tokens, "positions": args.positions, "engines": args.engines,
                     "decoding": "greedy", "vqa_convention": args.vqa_convention},
        "answers": {"computed": outcome.computed, "reused_from_earlier_runs": outcome.reused},
        "metrics": {
            "exact_match": "answer equals the most frequent reference after trimming whitespace, a final period "
                           "and case",
            "vqa_accuracy": VQA_NOTE[args.vqa_convention],
            "identical_answer": "same generated token ids as the unpruned bucket",
            "first_token": "same first sampled token as the unpruned bucket (end-of-sequence included)",
            "token_f1": "F1 of the generated token-id multisets against the unpruned bucket's",
            "common_prefix": "longest common prefix of token ids over the longer answer's length",
            "ttft_ms": "median time to first token, from the decoded image (preprocessing included)",
        },
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": summarise(plans, ds, outcome.log.records, args.vqa_convention),
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_text(args.out / "summary.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    write_text(args.out / "summary.md", table)
    png = plot(report, args.out / "pareto.png")
    report["_table"], report["_plot"] = table, png
    return report


def _no_plot_reason(report: dict) -> str:
    if not any(r["items"] for r in report["rows"]):
        return "no plot (no item was answered by every bucket: see the skipped lines above)"
    return "no plot (matplotlib is not installed: pip install 'vlmprune[plot]')"


@main_wrapper("prune-eval")
def main(argv=None):
    quiet_libraries()
    args = _parser().parse_args(argv)
    report = evaluate(args)
    print(report["_table"])
    plot_note = str(report["_plot"]) if report["_plot"] else _no_plot_reason(report)
    a = report["answers"]
    print(f"wrote {args.out / 'results.jsonl'}, {args.out / 'summary.json'}, {args.out / 'summary.md'}, {plot_note} "
          f"({a['computed']} answers computed, {a['reused_from_earlier_runs']} reused, {report['seconds']}s)")
    return 0


if __name__ == "__main__":
    main()
