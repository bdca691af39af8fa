"""The ``prune-eval`` loop: every item through every selected bucket of every bundle (greedy), one JSON line per
answer appended to ``results.jsonl`` as soon as it exists, so a rerun of the same command resumes where a killed run
stopped and recomputes nothing.

Order: bundle by bundle (one decoder in memory at a time: a 7B decoder is 13.5 GB), and within a bundle item by
item through all of its buckets, the unpruned one first, so that slow drift of a shared machine touches every
bucket alike instead of whichever bucket ran last. Each bucket gets one untimed warm-up answer per process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from vlmprune.bundle import Bundle, bucket_for
from vlmprune.errors import VlmpruneError

from .eval_data import Dataset, Item
from .eval_log import FORMAT, ResultLog  # noqa: F401 (FORMAT: re-exported)
from .eval_out import claim_out
from .eval_progress import progress
from .preprocess import load_image

RESULTS = "results.jsonl"


@dataclass
class BundlePlan:
    folder: Path
    bundle_id: str  # sha256 of manifest.json: a re-exported bundle never reuses another bundle's answers
    label: str
    method: str
    buckets: list[dict]  # the unpruned bucket first; each stands for its keep ratio (an image of a multi-layout
    # family is answered by the bucket of its own layout with that keep ratio, recorded under this one's name)
    bundle: Bundle | None = None  # opened and verified once, here; the pipeline reuses it

    @property
    def reference(self) -> dict:
        return self.buckets[0]


def plan_bundles(folders: list[Path], keeps: list[float] | None, say=print) -> list[BundlePlan]:
    """Check every bundle and keep ratio before any answer is computed, so a typo fails in a second, not an hour."""
    plans: list[BundlePlan] = []
    for folder in folders:
        folder = Path(folder)
        bundle = Bundle.open(folder)  # the one verification of this bundle, before any answer is computed
        manifest = bundle.manifest
        bundle_id = bundle.manifest_sha[:16]
        if any(p.bundle_id == bundle_id for p in plans):
            say(f"prune-eval: {folder} is the same bundle as an earlier argument; evaluated once")
            continue
        buckets = manifest["vision"]["buckets"]
        unpruned = [b for b in buckets if b["method"] == "none"]
        if not unpruned:
            raise VlmpruneError(f"bundle {folder} has no unpruned (none) bucket to compare with",
                                "re-export it with prune-export, which always adds one")
        if keeps:
            chosen = []
            for keep in keeps:
                bucket, message = bucket_for(manifest, keep)
                if abs(bucket["keep"] - keep) > 1e-9:
                    say(f"prune-eval: {folder.name}: {message}")
                chosen.append(bucket)
        else:
            chosen = [b for b in buckets if b["method"] != "none"]
        selected = [unpruned[0]] + sorted({b["name"]: b for b in chosen if b["method"] != "none"}.values(),
                                          key=lambda b: -b["keep"])
        method = manifest.get("method")
        method = method.get("name") if isinstance(method, dict) else str(method or selected[-1]["method"])
        plans.append(BundlePlan(folder, bundle_id, folder.name, method, selected, bundle))
    names = [p.label for p in plans]
    for p in plans:  # two bundles in folders of the same name get their paths as labels
        if names.count(p.label) > 1:
            p.label = str(p.folder)
    return plans


def key(bundle_id: str, bucket: str, item: Item) -> tuple[str, str, str, str]:
    return (bundle_id, bucket, item.qid, item.fingerprint)


def _record(plan: BundlePlan, bucket: dict, item: Item, result, eos: int | None) -> dict:
    t = result.timings
    first = result.token_ids[0] if result.token_ids else (eos if result.stop_reason == "eos" else None)
    return {
        "bundle_id": plan.bundle_id, "bundle": plan.label, "bucket": bucket["name"], "method": bucket["method"],
        "keep": bucket["keep"], "k": bucket["k"], "qid": item.qid, "item": item.fingerprint,
        "bucket_used": result.bucket, "visual_tokens_kept": result.visual_tokens_kept,
        "text": result.text, "token_ids": result.token_ids, "first_token": first, "stop_reason": result.stop_reason,
        "tokens_generated": result.tokens_generated, "prompt_tokens": result.prompt_tokens,
        "ttft_ms": round(t.ttft_ms, 3), "preprocess_ms": round(t.preprocess_ms, 3),
        "text_encoder_ms": round(t.text_encoder_ms, 3), "vision_ms": round(t.vision_ms, 3),
        "prefill_ms": round(t.prefill_ms, 3), "total_ms": round(t.total_ms, 3),
    }


@dataclass
class RunOutcome:
    plans: list[BundlePlan]
    log: ResultLog
    skipped: list[dict]
    computed: int
    reused: int


def run_eval(plans: list[BundlePlan], dataset: Dataset, out: Path, *, max_new_tokens: int = 32,
             engines: str | None = None, positions: str = "contiguous", provider: str | None = None,
             threads: int | None = None, plain_progress: bool = False, stream=None) -> RunOutcome:
    """Answer every pending (bundle, bucket, item) and append it to ``out/results.jsonl``."""
    stream = stream or sys.stderr
    if max_new_tokens < 1:
        raise VlmpruneError(f"--max-new-tokens {max_new_tokens} must be at least 1", "give a positive number")
    claim_out(out)
    settings = {"max_new_tokens": max_new_tokens, "positions": positions, "engines": engines}
    log = ResultLog(out / RESULTS, settings)
    try:
        return _run(plans, dataset, log, max_new_tokens, engines, positions, provider, threads, plain_progress,
                    stream)
    finally:
        log.close()


def _bucket_for_image(pipe, slot: dict, image) -> dict:
    """The bucket that answers ``image`` for the keep ratio ``slot`` stands for (itself, for single-view families)."""
    bucket, _ = pipe.choose_bucket(slot["keep"], image)
    if bucket["method"] != slot["method"] or abs(bucket["keep"] - slot["keep"]) > 1e-9:
        raise VlmpruneError(f"the image has no {slot['method']} bucket at keep {slot['keep']}",
                            "re-export the bundle with every layout (the default)")
    return bucket


def _run(plans, dataset, log, max_new_tokens, engines, positions, provider, threads, plain_progress, stream):
    def missing(plan, item):
        return [b for b in plan.buckets if key(plan.bundle_id, b["name"], item) not in log]

    total = sum(len(plan.buckets) for plan in plans) * len(dataset.items)
    pending = sum(len(missing(plan, item)) for plan in plans for item in dataset.items)
    if log.repaired:
        print(f"prune-eval: {log.path}: dropped a half-written last line (the previous run was killed mid-write)",
              file=stream)
    if log.ignored:
        print(f"prune-eval: {log.path}: ignored {log.ignored} unreadable line(s)", file=stream)
    if pending < total:
        print(f"prune-eval: resuming: {total - pending} of {total} answers already in {log.path}", file=stream)
    skipped: list[dict] = []
    computed = 0
    bar = progress(pending, "prune-eval", "answer", stream=stream, plain=plain_progress) if pending else None
    try:
        for plan in plans:
            todo = [item for item in dataset.items if missing(plan, item)]
            if not todo:
                continue
            from .pipeline import open_bundle

            pipe = open_bundle(plan.bundle or plan.folder, provider=provider, threads=threads, positions=positions,
                               engines=engines)
            eos = pipe.decoder_spec.get("eos_token_id")
            warmed: set[str] = set()
            for item in todo:
                left = missing(plan, item)
                try:
                    image = load_image(item.image)
                    for slot in left:
                        bucket = _bucket_for_image(pipe, slot, image)
                        if bucket["name"] not in warmed:  # first session run pays allocation: keep it out of TTFT
                            pipe.generate(image, item.prompt, bucket=bucket, max_new_tokens=1)
                            warmed.add(bucket["name"])
                        result = pipe.generate(image, item.prompt, bucket=bucket, max_new_tokens=max_new_tokens)
                        log.append(_record(plan, slot, item, result, eos))
                        computed += 1
                        left = left[1:]
                        bar.update(1)
                except VlmpruneError as exc:
                    where = f"{plan.label} question {item.qid}"
                    skipped.append({"where": where, "reason": str(exc)})
                    bar.write(f"prune-eval: skipped {where}: {exc}")
                    bar.update(len(left))
            del pipe
    finally:
        if bar is not None:
            bar.close()
    return RunOutcome(plans, log, skipped, computed, total - pending)
