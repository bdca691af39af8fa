"""``prune-run`` (answer a question about an image) and ``prune-viz`` (picture the kept tokens)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmprune.cli_common import main_wrapper, quiet_libraries


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune-run", description="Answer a prompt about an image with a vlmprune bundle.")
    p.add_argument("bundle", type=Path, help="bundle folder written by prune-export")
    p.add_argument("--image", required=True, help="image file, or 'sample' for the built-in test picture")
    p.add_argument("--prompt", required=True)
    p.add_argument("--keep", type=float, help="keep ratio: that bucket, or the smallest bucket keeping at least this")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--positions", default="contiguous", choices=["contiguous", "original"],
                   help="position ids of the kept image tokens")
    p.add_argument("--provider", help="ONNX Runtime provider (default: TensorRT, CUDA, CPU, whichever is present)")
    p.add_argument("--threads", type=int, help="intra-op threads")
    p.add_argument("--engines", help="run the vision graphs on TensorRT engines from prune-build, e.g. trt10-fp16")
    p.add_argument("--verify", default="quick", choices=["quick", "full"],
                   help="bundle check before loading: quick (sizes, small files hashed, a sample digest of large "
                        "ones; default) or full (sha256 of every byte)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _image(arg: str):
    if arg == "sample":
        from vlmprune.sample import make_sample_image

        return make_sample_image()
    from .preprocess import load_image

    return load_image(arg)


@main_wrapper("prune-run")
def run_main(argv=None):
    quiet_libraries()
    args = _run_parser().parse_args(argv)
    from .pipeline import Pipeline

    image = _image(args.image)
    pipe = Pipeline(args.bundle, provider=args.provider, threads=args.threads, positions=args.positions,
                    engines=args.engines, verify=args.verify)
    bucket, message = pipe.choose_bucket(args.keep)
    if not args.json:
        print(message, file=sys.stderr)
    on_text = (lambda s: print(s, end="", flush=True)) if args.stream and not args.json else None
    result = pipe.generate(image, args.prompt, bucket=bucket, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_text=on_text)
    if args.json:
        out = result.to_dict()
        out["bucket_choice"] = message
        print(json.dumps(out))
    else:
        if on_text is None:
            print(result.text, end="")
        print()
        print(result.timing_line())
    return 0


def _viz_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prune-viz", description="Picture the kept visual tokens of one or more bundles.")
    p.add_argument("bundles", type=Path, nargs="+", help="bundle folder(s); one row each")
    p.add_argument("--image", required=True, help="image file, or 'sample'")
    p.add_argument("--prompt", default="Describe the image.", help="prompt (text-guided methods use it)")
    p.add_argument("--keep", type=float, nargs="*", help="keep ratio(s) to show (default: every pruned bucket)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output PNG")
    return p


@main_wrapper("prune-viz")
def viz_main(argv=None):
    quiet_libraries()
    args = _viz_parser().parse_args(argv)
    from .pipeline import Pipeline
    from .viz import compose, model_view, overlay

    _check_picture_path(args.out)
    image = _image(args.image)
    rows = []
    for folder in args.bundles:
        pipe = Pipeline(folder)
        view = model_view(image, pipe.preprocess)
        buckets = [pipe.choose_bucket(k)[0] for k in args.keep] if args.keep else [
            b for b in pipe.manifest["vision"]["buckets"] if b["method"] != "none"]
        grid = tuple(pipe.manifest["vision"]["view"]["grid"])
        pixels = pipe.preprocess(image)
        row = []
        for bucket in buckets:
            _, kept, _ = pipe.vision(pixels, bucket, args.prompt)
            label = f"{bucket['method']} keep {bucket['keep']} ({bucket['k']}/{pipe.num_patches})"
            row.append(overlay(view, kept[0].tolist(), grid, label))
        rows.append(row)
    from PIL import Image

    from vlmprune.atomic import atomic_output, ensure_folder

    ensure_folder(args.out.parent, "-o")
    with atomic_output(args.out) as tmp:  # a full disk or a kill leaves no half-written picture
        compose(rows).save(tmp, format=Image.registered_extensions()[args.out.suffix.lower()])
    print(f"wrote {args.out}")
    return 0


def _check_picture_path(out: Path) -> None:
    """``-o`` must name a file with an extension Pillow can write, before any work is done."""
    from PIL import Image

    from vlmprune.errors import VlmpruneError

    if out.is_dir():
        raise VlmpruneError(f"-o {out} is a folder", "give a file name such as kept.png")
    Image.init()
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise VlmpruneError(f"-o {out}: unknown picture extension {out.suffix or '(none)'!r}",
                            "use .png, .jpg or .webp")
