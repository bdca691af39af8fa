"""``prune-calibrate``: INT8 calibration of a bundle's vision buckets (Q/DQ ONNX, and TensorRT caches where
TensorRT is present), with an accuracy report of the quantised graphs against fp32."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vlmprune import graph_io
from vlmprune.atomic import DirLock, clean_leftovers, make_temp_dir, remove_temp, swap_dirs
from vlmprune.bundle import Bundle
from vlmprune.cli_common import HelpFormatter, main_wrapper, quiet_libraries, require_extra
from vlmprune.errors import VlmpruneError
from vlmprune.integrity import make_record, write_record

OUT = "int8"  # the calibration's own subfolder: qdq/, calib/, report.json, record.json


HOLDOUT = 8  # images held out for the accuracy report by default, at most a quarter of those found


def _parser():
    p = argparse.ArgumentParser(
        prog="prune-calibrate", formatter_class=HelpFormatter,
        description="INT8 calibration of a bundle's vision buckets: Q/DQ ONNX graphs (and TensorRT 8.x calibration caches "
                    "where TensorRT 8.x and its GPU are) in BUNDLE/int8/, with an accuracy report of the quantised graphs "
                    "against fp32 on held-out images. Needs the calibrate extra (onnx).")
    p.add_argument("bundle", type=Path, help="bundle folder written by prune-export")
    p.add_argument("--images", type=Path, required=True,
                   help="folder of representative photos (searched recursively); a few hundred is typical")
    p.add_argument("--num", type=int, default=256, help="images to calibrate with")
    p.add_argument("--algo", default="entropy", choices=["entropy", "minmax", "percentile"],
                   help="activation range: entropy (KL divergence, TensorRT's default), minmax, or percentile; TensorRT 8.x "
                        "caches are entropy only")
    p.add_argument("--holdout", type=int,
                   help=f"images kept out of calibration for the accuracy report (default: the smaller of {HOLDOUT} and "
                        "a quarter of the images found); with 0 the report uses a calibration image")
    return p


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:  # the edge runtime may lack tqdm: plain iteration
        return None
    return lambda it, **kw: tqdm(it, file=sys.stderr, **kw)


def _log(line: str) -> None:
    """A status line on stderr that does not break a progress bar drawn there."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=sys.stderr)
    else:
        tqdm.write(line, file=sys.stderr)


def _text_embeds(bundle, manifest: dict, count: int) -> list[np.ndarray]:
    from vlmprune.runtime.backends import OrtBackend, check_io
    from vlmprune.runtime.prompt import load_tokenizer

    from .data import PROMPTS

    spec = manifest["text_encoder"]
    tok = load_tokenizer(bundle.path(spec["tokenizer"]), "CLIP tokenizer")
    enc = check_io(OrtBackend(bundle.path(spec["file"])), spec, "the text encoder")
    embeds = [graph_io.by_kind(spec["outputs"], enc.run(graph_io.feeds(
        spec["inputs"], {"input_ids": np.asarray([tok.encode(p).ids])}, "text encoder")))["text_embeds"]
        for p in PROMPTS]
    return [embeds[i % len(embeds)] for i in range(count)]


def _float_scopes(manifest: dict) -> tuple[str, ...]:
    """Node-name scopes left in floating point besides the pinned ones: the family's, as the export recorded them;
    bundles from before that record it get CLIP's scoring-attention scope from ``model.vision.layers_run``."""
    recorded = manifest["vision"].get("int8_float_scopes")
    if recorded is not None:
        return tuple(recorded)
    layers_run = ((manifest.get("model") or {}).get("vision") or {}).get("layers_run")
    return (f"/layers.{layers_run - 1}/self_attn/",) if type(layers_run) is int and layers_run > 0 else ()


def _parts(bucket: dict) -> list[tuple[str, str, str | None]]:
    """(embeddings, kept indices, count or None) output names of each kept sequence of the bucket's graph: one for
    single-view graphs, the base view and the raster for anyres ones."""
    outs, where = bucket["outputs"], f"bucket {bucket['name']} outputs"
    if graph_io.has(outs, "image_embeds"):
        return [(graph_io.name_of(outs, "image_embeds", where), graph_io.name_of(outs, "kept_indices", where), None)]
    return [(graph_io.name_of(outs, "base_embeds", where), graph_io.name_of(outs, "base_indices", where), None),
            (graph_io.name_of(outs, "raster_embeds", where), graph_io.name_of(outs, "raster_indices", where),
             graph_io.name_of(outs, "raster_count", where))]


def _check_graph_io(path: Path, bucket: dict) -> None:
    """The bucket's graph has the inputs and outputs its manifest entry lists (read from the graph, not its weights)."""
    from types import SimpleNamespace

    import onnx

    from vlmprune.runtime.backends import check_io

    graph = onnx.load(str(path), load_external_data=False).graph
    values = list(graph.input) + list(graph.output)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in values}
    types = {v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)) for v in values}
    found = SimpleNamespace(inputs={v.name: None for v in graph.input}, outputs=[v.name for v in graph.output],
                            shapes=dims, types=types)
    check_io(found, bucket, f"the graph of bucket {bucket['name']}")


@main_wrapper("prune-calibrate")
def main(argv=None):
    quiet_libraries()
    args = _parser().parse_args(argv)
    require_extra("prune-calibrate", "calibrate", "onnx")  # ONNX Runtime's quantiser reads and writes onnx models
    from .cache import calibration_support, check_algo, write_cache
    from .data import load_calibration_images
    from .qdq import accuracy, quantize

    if args.num < 1:
        raise VlmpruneError(f"--num {args.num} must be at least 1", "e.g. --num 256")
    if args.holdout is not None and args.holdout < 0:
        raise VlmpruneError(f"--holdout {args.holdout} must be 0 or more", "e.g. --holdout 8")
    caches, why_not = calibration_support()
    if caches:
        check_algo(args.algo)  # before any work: the caches would be unreadable to prune-build
    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    # Everything goes to a temporary folder inside the bundle and replaces int8/ in one step, with its own record:
    # the export's record is never touched, and a killed run leaves only a marked leftover (removed next time).
    with DirLock(bundle.folder, OUT, f"{bundle.folder / OUT}"):
        for line in clean_leftovers(bundle.folder):
            _log(line)
        tmp = make_temp_dir(bundle.folder, OUT)
        try:
            meta = _calibrate(args, bundle, manifest, tmp, load_calibration_images, quantize, accuracy,
                              (caches, why_not), write_cache)
            write_record(tmp, make_record(tmp, written_by="prune-calibrate", meta=meta))
            old = swap_dirs(tmp, bundle.folder / OUT)
            if old is not None:
                remove_temp(old)
        except BaseException:
            remove_temp(tmp)
            raise
    report = meta["accuracy"]
    print(f"{'bucket':>16} | index overlap (mean / min) | embedding rel. error | cosine")
    for name, r in report.items():
        print(f"{name:>16} | {r['kept_index_overlap_mean']:.3f} / {r['kept_index_overlap_min']:.3f}"
              f"               | {r['embedding_relative_error_mean']:.4f}               | {r['embedding_cosine_mean']:.4f}")
    print(f"Q/DQ graphs in {bundle.folder / OUT / 'qdq'} ({meta['tool']}); TensorRT calibration caches "
          f"{meta['calibration_caches']}")
    return 0


def _calibrate(args, bundle, manifest, tmp: Path, load_calibration_images, quantize, accuracy, support,
               write_cache) -> dict:
    progress = _progress()
    auto = args.holdout is None
    from .data import family_runtime, image_inputs

    family = family_runtime(bundle)  # the preprocessing every request of this bundle gets
    pixels, skipped = load_calibration_images(args.images, args.num + (HOLDOUT if auto else args.holdout), progress)
    n = len(pixels)
    holdout = min(HOLDOUT, n // 4) if auto else args.holdout
    if holdout >= n:  # never shrink the calibration set silently to make room for the report
        raise VlmpruneError(f"--holdout {holdout} leaves no image to calibrate with ({n} readable in {args.images})",
                            f"give --holdout {n // 4} or less, or more images")
    calib_px, eval_px = pixels[: n - holdout], pixels[n - holdout:] if holdout else pixels[:1]
    how = f" (default: min({HOLDOUT}, a quarter of the {n} found); --holdout N to change)" if auto else ""
    _log(f"calibration images: {len(calib_px)}; held out for the accuracy report: {holdout}{how}; "
         f"unreadable skipped: {skipped}")
    if holdout == 0:
        _log("no image held out: the accuracy report is measured on a calibration image (optimistic)")
    if len(calib_px) < 32:
        _log(f"only {len(calib_px)} calibration image(s): INT8 ranges from so few are rough; a few hundred "
             "representative photos are typical")
    calib_dir = tmp / "calib"
    calib_dir.mkdir()
    text_all = _text_embeds(bundle, manifest, len(pixels)) if manifest.get("text_encoder") else None

    def inputs(bucket, image):
        return image_inputs(family, bucket, image)

    first = [inputs(b, calib_px[0])["pixel_values"] for b in manifest["vision"]["buckets"]]
    if all(f.ndim == 4 and f.shape[0] == 1 and f.shape == first[0].shape for f in first):
        # one [1, 3, H, W] view for every bucket: the batches, for trtexec --loadInputs or a later cache build
        np.save(calib_dir / "pixel_values.npy", np.concatenate([inputs(manifest["vision"]["buckets"][0], im)
                                                                ["pixel_values"] for im in calib_px]))

    def feeds_for(bucket, px, offset):
        needs_text = graph_io.has(bucket["inputs"], "text_embeds")
        where = f"bucket {bucket['name']}"
        return [graph_io.feeds(bucket["inputs"], {**inputs(bucket, px[i]),
                                                  **({"text_embeds": text_all[offset + i]} if needs_text else {})},
                               where) for i in range(len(px))]

    report, tool = {}, None
    scopes = _float_scopes(manifest)
    from vlmprune.export.trt_build import fp32_pattern, unpinned_note, unpinned_selection

    pinned = fp32_pattern(manifest)  # the family's fp32 scopes, as prune-build pins them
    buckets = manifest["vision"]["buckets"]
    iterator = progress(buckets, desc="quantise", unit="bucket") if progress else buckets
    qdq = {}
    for bucket in iterator:
        src = bundle.path(bucket["file"])
        _check_graph_io(src, bucket)
        missed = unpinned_selection(src, pinned)
        if missed:
            _log(unpinned_note(bucket["name"], missed))
        rel = "qdq/" + bucket["file"].replace(".onnx", ".qdq.onnx")
        calib_feeds = feeds_for(bucket, calib_px, 0)
        tool = quantize(src, tmp / rel, calib_feeds, args.algo, float_scopes=scopes, pinned=pinned)
        # held-out images follow the calibration ones; with --holdout 0 the report reuses the first of those
        report[bucket["name"]] = accuracy(src, tmp / rel, feeds_for(bucket, eval_px, len(calib_px) if holdout else 0),
                                          _parts(bucket))
        qdq[bucket["name"]] = rel
        if support[0]:  # pragma: no cover - needs TensorRT 8.x and a GPU
            write_cache(src, calib_dir / f"{bucket['name']}.cache", calib_feeds, args.algo)
    caches = "written" if support[0] else f"not written ({support[1]})"
    meta = {
        "for_manifest": bundle.manifest_sha, "algo": args.algo, "tool": tool, "images": int(len(calib_px)),
        "skipped": skipped, "qdq": qdq, "calibration_caches": caches, "accuracy": report,
    }
    (tmp / "report.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
