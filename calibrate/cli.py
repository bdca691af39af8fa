"""``prune-calibrate``: INT8 calibration of a bundle's vision buckets (Q/DQ ONNX, and TensorRT caches where
TensorRT is present), with an accuracy report of the quantised graphs against fp32."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from vlmprune.bundle import checksums, load_manifest, write_manifest
from vlmprune.cli_common import main_wrapper, quiet_libraries
from vlmprune.errors import VlmpruneError


def _parser():
    p = argparse.ArgumentParser(prog="prune-calibrate", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("bundle", type=Path)
    p.add_argument("--images", type=Path, required=True, help="folder of calibration images (searched recursively)")
    p.add_argument("--num", type=int, default=256, help="images to use (default 256)")
    p.add_argument("--algo", default="entropy", choices=["entropy", "minmax", "percentile"])
    p.add_argument("--holdout", type=int, default=8, help="images kept out of calibration for the accuracy report")
    return p


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:  # the edge runtime may lack tqdm: plain iteration
        return None
    return lambda it, **kw: tqdm(it, file=sys.stderr, **kw)


def _text_embeds(bundle: Path, manifest: dict, count: int) -> list[np.ndarray]:
    from vlmprune.runtime.backends import OrtBackend
    from tokenizers import Tokenizer

    from .data import PROMPTS

    spec = manifest["text_encoder"]
    tok = Tokenizer.from_file(str(bundle / spec["tokenizer"]))
    enc = OrtBackend(bundle / spec["file"])
    embeds = [enc.run({"input_ids": np.asarray([tok.encode(p).ids])})["text_embeds"] for p in PROMPTS]
    return [embeds[i % len(embeds)] for i in range(count)]


@main_wrapper("prune-calibrate")
def main(argv=None):
    quiet_libraries()
    args = _parser().parse_args(argv)
    from .cache import tensorrt_available, write_cache
    from .data import load_calibration_images
    from .qdq import accuracy, quantize

    if args.num < 1:
        raise VlmpruneError(f"--num {args.num} must be at least 1", "e.g. --num 256")
    bundle = args.bundle
    manifest = load_manifest(bundle)
    progress = _progress()
    pixels, skipped = load_calibration_images(args.images, manifest["preprocessing"], args.num + args.holdout, progress)
    holdout = min(args.holdout, max(0, len(pixels) - 1))
    calib_px, eval_px = pixels[: len(pixels) - holdout], pixels[len(pixels) - holdout:] if holdout else pixels[:1]
    print(f"calibration images: {len(calib_px)} (+{holdout} held out for the report), {skipped} unreadable skipped",
          file=sys.stderr)
    calib_dir = bundle / "calib"
    calib_dir.mkdir(exist_ok=True)
    np.save(calib_dir / "pixel_values.npy", calib_px)  # the batches, for trtexec --loadInputs or a later cache build
    text_all = _text_embeds(bundle, manifest, len(pixels)) if manifest.get("text_encoder") else None

    def feeds_for(bucket, px, offset):
        needs_text = any(i["name"] == "text_embeds" for i in bucket["inputs"])
        return [{"pixel_values": px[i : i + 1], **({"text_embeds": text_all[offset + i]} if needs_text else {})}
                for i in range(len(px))]

    report, tool = {}, None
    scoring_scope = f"/layers.{manifest['model']['vision']['layers_run'] - 1}/self_attn/"
    buckets = manifest["vision"]["buckets"]
    iterator = progress(buckets, desc="quantise", unit="bucket") if progress else buckets
    # Q/DQ graphs are written to a temporary folder and moved into place only when every bucket is done.
    qdq_tmp = Path(tempfile.mkdtemp(prefix=".qdq.tmp-", dir=bundle))
    try:
        for bucket in iterator:
            src = bundle / bucket["file"]
            out = qdq_tmp / bucket["file"].replace(".onnx", ".qdq.onnx")
            calib_feeds = feeds_for(bucket, calib_px, 0)
            tool = quantize(src, out, calib_feeds, args.algo, float_scopes=(scoring_scope,))
            report[bucket["name"]] = accuracy(src, out, feeds_for(bucket, eval_px, len(calib_px)))
            if tensorrt_available():  # pragma: no cover - needs TensorRT
                write_cache(src, calib_dir / f"{bucket['name']}.cache", calib_feeds, args.algo)
        if (bundle / "qdq").exists():
            shutil.rmtree(bundle / "qdq")
        os.replace(qdq_tmp, bundle / "qdq")
    except BaseException:
        shutil.rmtree(qdq_tmp, ignore_errors=True)
        raise
    caches = "written" if tensorrt_available() else "not written (TensorRT is not installed here; use the Q/DQ graphs)"
    manifest["int8"] = {
        "algo": args.algo, "tool": tool, "images": int(len(calib_px)), "skipped": skipped,
        "qdq": {b["name"]: "qdq/" + b["file"].replace(".onnx", ".qdq.onnx") for b in buckets},
        "calibration_caches": caches, "accuracy": report,
    }
    (calib_dir / "report.json").write_text(json.dumps(manifest["int8"], indent=2) + "\n")
    manifest["files"] = checksums(bundle)
    write_manifest(bundle, manifest)
    print(f"{'bucket':>16} | index overlap (mean / min) | embedding rel. error | cosine")
    for name, r in report.items():
        print(f"{name:>16} | {r['kept_index_overlap_mean']:.3f} / {r['kept_index_overlap_min']:.3f}"
              f"               | {r['embedding_relative_error_mean']:.4f}               | {r['embedding_cosine_mean']:.4f}")
    print(f"Q/DQ graphs in {bundle / 'qdq'} ({tool}); TensorRT calibration caches {caches}")
    return 0
