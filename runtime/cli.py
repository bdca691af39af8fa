"""``prune-run`` (answer a question about an image) and ``prune-viz`` (picture the kept tokens)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmprune import graph_io
from vlmprune.cli_common import HelpFormatter, add_session_args, main_wrapper, quiet_libraries, session_kwargs


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune-run", formatter_class=HelpFormatter,
        description="Answer a prompt about an image with a vlmprune bundle, then print a timing line: preprocess, "
                    "text encoder, vision+prune, prefill, TTFT (from the image to the first token, so it also holds "
                    "tokenising, stitching and sampling), TPOT, and why generation stopped (eos, length, context).")
    p.add_argument("bundle", type=Path, help="bundle folder written by prune-export")
    p.add_argument("--image", help="image file, or 'sample' for the built-in test picture (required unless --plan)")
    p.add_argument("--prompt", help="the question (required unless --plan)")
    p.add_argument("--keep", type=float,
                   help="keep ratio: that bucket, or the smallest bucket keeping at least this (said on stderr); "
                        "default: the bundle's most pruned bucket (smallest keep)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="seed of the sampler, for reproducible sampling (default: random)")
    add_session_args(p)
    p.add_argument("--plan", action="store_true",
                   help="print where each stage would run (backend and device) and exit, loading no graph")
    p.add_argument("--require-gpu", action="store_true",
                   help="fail instead of warning when a stage would run on the CPU (or there is no NVIDIA GPU)")
    p.add_argument("--verify", default="quick", choices=["quick", "full"],
                   help="bundle check before loading: quick (sizes, small files hashed, a sample digest of large "
                        "ones) or full (sha256 of every byte) (default: quick)")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (with --json: on stderr, the JSON on stdout at the end)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (answer, timings, stages)")
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
    parser = _run_parser()
    args = parser.parse_args(argv)
    from .sampling import check_generation_args

    check_generation_args(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before any work or line
    if args.plan:
        return _plan(args)
    missing = [flag for flag, value in (("--image", args.image), ("--prompt", args.prompt)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --plan)")
    from .pipeline import open_bundle
    from .stages import environment_dict, report_lines

    image = _image(args.image)
    pipe = open_bundle(args.bundle, verify=args.verify, require_gpu=args.require_gpu, **session_kwargs(args))
    bucket, message = pipe.choose_bucket(args.keep, image)  # among the buckets this image can use
    stages = pipe.stage_report(bucket)  # as loaded, printed once
    warnings = pipe.planner.check_devices(stages, args.require_gpu)
    if not args.json:
        print(message, file=sys.stderr)
        print("\n".join(report_lines(stages, pipe.env)), file=sys.stderr)
    for line in warnings:
        print(f"prune-run: {line}", file=sys.stderr)
    stream_to = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the one JSON object
    on_text = (lambda s: print(s, end="", flush=True, file=stream_to)) if args.stream else None
    result = pipe.generate(image, args.prompt, bucket=bucket, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_text=on_text)
    if args.json:
        if on_text is not None:
            print(file=sys.stderr)
        out = result.to_dict()
        out["bucket_choice"] = message
        out["decoder"] = pipe.decoder_kind
        out["stages"] = [s.to_dict() for s in stages]
        out["warnings"] = warnings
        out["environment"] = environment_dict(pipe.env)
        print(json.dumps(out))
    else:
        if on_text is None:
            print(result.text, end="")
        print()
        print(result.timing_line())
    return 0


def _plan(args) -> int:
    """``--plan``: the stage report of a run with these options, without loading any graph."""
    from .stages import environment_dict, plan_bundle, report_lines

    plan = plan_bundle(args.bundle, engines=args.engines, provider=args.provider, positions=args.positions,
                       decoder=args.decoder, keep=args.keep, verify=args.verify, require_gpu=args.require_gpu)
    if args.json:
        print(json.dumps({"plan": True, "bucket": plan["bucket"], "bucket_choice": plan["bucket_choice"],
                          "engines": plan["engines"], "stages": [s.to_dict() for s in plan["stages"]],
                          "warnings": plan["warnings"], "environment": environment_dict(plan["env"])}))
    else:
        print(plan["bucket_choice"])
        print("\n".join(report_lines(plan["stages"], plan["env"], title="plan")))
        for line in plan["warnings"]:
            print(f"prune-run: {line}", file=sys.stderr)
    return 0


def _viz_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune-viz", formatter_class=HelpFormatter,
        description="Picture the kept visual tokens of one or more bundles: the model's view of the image, each kept "
                    "token boxed at full brightness, dropped patches dimmed; one row per bundle, one panel per bucket, "
                    "with the prompt and a legend. pool averages every patch into 2x2 windows and is drawn that way.")
    p.add_argument("bundles", type=Path, nargs="+", help="bundle folder(s); one row each")
    p.add_argument("--image", required=True, help="image file, or 'sample' for the built-in test picture")
    p.add_argument("--prompt", default="Describe the image.",
                   help="prompt; text-guided methods (gridprune) select by it, the others ignore it")
    p.add_argument("--keep", type=float, nargs="*",
                   help="keep ratio(s) to show; a ratio with no bucket shows the next larger one and says so "
                        "(default: every pruned bucket; 1.0 shows the unpruned view)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output picture (.png, .jpg, .webp)")
    return p


@main_wrapper("prune-viz")
def viz_main(argv=None):
    quiet_libraries()
    args = _viz_parser().parse_args(argv)
    from vlmprune.errors import VlmpruneError

    from .pipeline import open_bundle
    from .viz import POOLING, Row, compose

    _check_picture_path(args.out)
    image = _image(args.image)
    rows, pooled = [], False
    for folder in args.bundles:
        pipe = open_bundle(folder)
        if args.keep:
            chosen = []
            for k in args.keep:
                bucket, message = pipe.choose_bucket(k, image)
                substituted = abs(bucket["keep"] - k) > 1e-9
                if substituted:  # never a silent swap: on stderr and on the panel
                    print(f"prune-viz: {folder}: {message}", file=sys.stderr)
                chosen.append((bucket, f"asked keep {k}: no such bucket; next larger shown" if substituted else ""))
        else:
            chosen = [(b, "") for b in pipe.family.buckets_for(image) if b["method"] != "none"]
            if not chosen:
                raise VlmpruneError(f"{folder} has only the unpruned `none` bucket, so nothing is dropped to draw",
                                    "pass --keep 1.0 to draw it anyway, or export a pruning method")
        panels = []
        for bucket, note in chosen:
            req = pipe.request(image, args.prompt, bucket=bucket)
            pool = POOLING.get(bucket["method"], 0)
            pooled |= bool(pool)
            text_guided = graph_io.has(bucket["inputs"], "text_embeds")
            title = f"{bucket['method']} keep {bucket['keep']}: {len(req.stitched.kept)}/{req.stitched.total} tokens"
            if not note:
                note = ("every patch averaged into %dx%d windows, none dropped" % (pool, pool) if pool else
                        "unpruned: every patch kept" if bucket["method"] == "none" else
                        "text-guided: selected for the prompt" if text_guided else "image-only: the prompt plays no part")
            panels += pipe.family.panels(image, bucket, req.view, req.outputs, req.stitched, title=title, note=note,
                                         pool=pool)
        note = f" ({req.view.note})" if req.view.note else ""
        rows.append(Row(f"bundle {folder}{note}: {pipe.family.view_caption}", panels))
    image_name = "the built-in sample picture" if args.image == "sample" else Path(args.image).name
    title_lines = [f"image: {image_name}; each row shows it as that bundle's model sees it",
                   f"prompt: \"{args.prompt}\""]
    from PIL import Image

    from vlmprune.atomic import atomic_output, ensure_folder

    ensure_folder(args.out.parent, "-o")
    with atomic_output(args.out) as tmp:  # a full disk or a kill leaves no half-written picture
        compose(rows, title_lines, pooled).save(tmp, format=Image.registered_extensions()[args.out.suffix.lower()])
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
