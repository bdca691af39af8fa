"""``prune-export``: export a VLM's vision graph with pruning buckets, text encoder and decoder to a bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmprune.cli_common import HelpFormatter, main_wrapper, parse_list, quiet_libraries, require_extra
from vlmprune.errors import VlmpruneError
from vlmprune.methods import METHOD_NAMES, check_method_name


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise VlmpruneError(f"--option {pair!r} is not key=value", "e.g. --option strategy=row")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


class _ListOptions(argparse.Action):
    """Prints the registry's options and exits, before the required arguments are checked (as --help does)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        require_extra("prune-export", "export", "torch")  # the options' definitions live with the torch modules
        from vlmprune.prune import METHODS

        for spec in METHODS.values():
            print(f"{spec.name}: {spec.description}")
            print("\n".join(spec.describe_options()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Torch-free, so --help reads on the edge install and a mistake is reported before torch loads."""
    from .targets import DEFAULT_TARGET, TARGETS

    p = argparse.ArgumentParser(
        prog="prune-export", formatter_class=HelpFormatter,
        description="Export a VLM's vision encoder + pruning graph (one static budget bucket per keep ratio), "
        "the CLIP text encoder where the method needs it, and the KV-cache decoder, validated against PyTorch. "
        "Method semantics and options: docs/methods.md, or --list-options.",
    )
    p.add_argument("--model", default="tiny-llava", help="built-in preset, local folder or cached HF id (default: tiny-llava)")
    p.add_argument("--method", required=True,
                   help=f"pruning method: {', '.join(METHOD_NAMES)} (options of each: --list-options)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", help="keep ratio(s), comma-separated, each in (0, 1]: e.g. 0.25,0.5")
    budget.add_argument("--tokens", help="token budget(s) K, comma-separated, each in 1..N (N = 576 on LLaVA-1.5)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable); ranges and defaults: --list-options")
    p.add_argument("--list-options", action=_ListOptions, help="print every method's options, defaults and ranges")
    p.add_argument("--out", type=Path, help="output folder (default: exports/<model>-<method>)")
    p.add_argument("--target", default=DEFAULT_TARGET, choices=sorted(TARGETS), help="TensorRT version the graphs are for (opset, LayerNorm form, lint); JetPack 6.0 "
                   "(TensorRT 8.6) needs trt8.6")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="vision graphs: fp32, or fp16 (the encoder in fp16; every LayerNorm and the pruning subgraph in "
                        "fp32; validated by kept-index overlap with fp32 PyTorch)")
    p.add_argument("--decoder-precision", choices=["fp32", "fp16", "int8", "int4"],
                   help="LLM decoder weights: fp16 (weights and KV cache), int8/int4 (weight-only MatMulNBits for "
                        "ONNX Runtime CPU/CUDA) or fp32 (default: fp16 for checkpoints stored in fp16/bf16, else fp32)")
    p.add_argument("--fused-decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="also write decoder_fused.onnx, ONNX Runtime GenAI's model builder graph (fused attention, "
                        "in-place KV cache) that prune-run uses on ONNX Runtime CPU/CUDA; TensorRT keeps decoder.onnx "
                        "(default: on when onnxruntime-genai is installed)")
    p.add_argument("--clip", help="CLIP model for GridPrune's text tower (a preset brings its own)")
    family_options = p.add_argument_group("family options", "taken by one model family only (refused for others)")
    from vlmprune.models.registry import families

    added = set()
    for fam in families().values():  # declared by each family (models/<family>/__init__.py), torch-free
        for opt in fam.options:
            if opt.flag not in added:  # a flag several families declare (--image-size) is one argument
                added.add(opt.flag)
                family_options.add_argument(opt.flag, dest=f"family_{opt.dest}", metavar=opt.metavar, help=opt.help)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation against PyTorch")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux ru_maxrss is in KiB), as the scale issue's memory bound is stated."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@main_wrapper("prune-export")
def main(argv=None):
    args = build_parser().parse_args(argv)
    # what can be checked without torch or transformers is checked before they load (seconds on a small board)
    check_method_name(args.method)
    keeps, tokens = parse_list(args.keep, float, "--keep"), parse_list(args.tokens, int, "--tokens")
    options, family_options = _options(args.option), _family_options(args)  # parsers of the family options
    quiet_libraries()  # imports transformers' logging: after the checks
    require_extra("prune-export", "export", "torch", "transformers", "onnx")
    from .exporter import ExportRequest, export_bundle
    from .progress import Steps

    req = ExportRequest(
        model=args.model,
        method=args.method,
        keeps=keeps,
        tokens=tokens,
        options=options,
        out=args.out,
        target=args.target,
        precision=args.precision,
        decoder_precision=args.decoder_precision,
        fused_decoder=args.fused_decoder,
        force=args.force,
        validate=args.validate,
        clip=args.clip,
        trust_remote_code=args.trust_remote_code,
        family_options=family_options,
    )
    steps = Steps(quiet=args.quiet)
    result = export_bundle(req, steps)
    buckets = result.manifest["vision"]["buckets"]
    summary = {
        "bundle": str(result.path),
        "buckets": [{"name": b["name"], "keep": b["keep"], "k": b["k"]} for b in buckets],
        "validation_passed": None if result.validation is None else result.validation["passed"],
        "lint_ok": {t: all(g[t]["ok"] for g in result.manifest["lint"].values()) for t in next(iter(result.manifest["lint"].values()))},
        "decoder_precision": result.manifest["decoder"]["precision"],
        "seconds": round(steps.elapsed, 2),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for b in buckets:
            print(f"{b['name']:>16}: keep {b['keep']:<6} -> {b['k']} visual tokens  ({b['file']})")
        from .targets import TARGETS

        ok = [t for t, good in summary["lint_ok"].items() if good]
        print(f"TensorRT lint (exported for --target {args.target}): loads on {', '.join(ok) or 'none'}")
        for target, good in summary["lint_ok"].items():
            if not good:  # other TensorRT versions need their own export; only the chosen target failing is an alarm
                rules = sorted({f["rule"] for g in result.manifest["lint"].values()
                                for f in g[target]["findings"] if f["level"] == "error"})
                jetpack = f" ({TARGETS[target].jetpack})" if target in TARGETS and TARGETS[target].jetpack else ""
                if target == args.target:
                    print(f"  {target}: FAIL ({', '.join(rules)})")
                else:
                    print(f"  TensorRT {target[3:]}{jetpack} needs its own export with --target {target} "
                          f"(this one has: {', '.join(rules)})")
        print(f"bundle: {result.path}  ({summary['seconds']}s)", file=sys.stdout)
    return 0


def _family_options(args) -> dict:
    """The family-only options given, parsed by their families' declared parsers (before any weights load)."""
    from vlmprune.models.registry import families

    out = {}
    owners: dict[str, int] = {}
    for fam in families().values():
        for opt in fam.options:
            owners[opt.dest] = owners.get(opt.dest, 0) + 1
    for fam in families().values():
        for opt in fam.options:
            text = getattr(args, f"family_{opt.dest}", None)
            if text is not None:
                # declared by several families: kept as text, parsed by the model's family once config.json is read
                out[opt.dest] = opt.parse_value(text) if owners[opt.dest] == 1 else text
    return out


if __name__ == "__main__":
    main()
