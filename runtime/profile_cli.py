"""``prune-profile``: latency of each bucket's engine or graph against its keep ratio.

``--backend trt`` runs trtexec on the bundle's engines and parses its summary; ``--from-log`` parses saved trtexec
logs (a log named after a bucket, e.g. ``fopru-k144.log``, is matched to it); ``--backend ort`` times the ONNX
Runtime graphs on this machine with the same statistics. Writes a markdown table, JSON, CSV and a PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from vlmprune.atomic import DirLock, clean_leftovers, ensure_folder, make_temp_dir, remove_temp, swap_dirs
from vlmprune.cli_common import HelpFormatter, main_wrapper
from vlmprune.errors import VlmpruneError

from .trtexec_log import parse_file

PERCENTILES = (90, 95, 99)


def _stats_ms(times: list[float]) -> dict:
    a = np.asarray(times)
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "median": float(np.median(a)),
            **{f"p{p}": float(np.percentile(a, p)) for p in (10, *PERCENTILES)}}  # p10: the plot's lower whisker


def _row(name: str, bucket: dict | None, stats: dict, source: str, **extra) -> dict:
    return {"name": name, "method": bucket["method"] if bucket else None, "keep": bucket["keep"] if bucket else None,
            "k": bucket["k"] if bucket else None, "source": source, **stats, **extra}


def profile_ort(bundle, manifest: dict, iterations: int, warmup: int) -> list[dict]:
    """``bundle``: an opened ``vlmprune.bundle.Bundle`` (graphs are opened only through its verified record)."""
    from .backends import OrtBackend, check_io
    from .profile import timed

    rows = []
    rng = np.random.default_rng(0)
    for b in manifest["vision"]["buckets"]:
        backend = check_io(OrtBackend(bundle.path(b["file"])), b, f"the graph of bucket {b['name']}")
        feeds = {}
        for entry in b["inputs"]:  # synthetic inputs of the graph's own shapes and dtypes (checked against the
            # manifest by check_io); the manifest says what each input is
            shape = [d if isinstance(d, int) else 1 for d in backend.shapes[entry["name"]]]
            dtype = backend.inputs[entry["name"]]
            if entry["kind"] == "valid_mask":  # every position of the layout valid: the most work
                feeds[entry["name"]] = np.ones(shape, dtype)
                continue
            x = rng.standard_normal(shape).astype(dtype)
            feeds[entry["name"]] = x / np.linalg.norm(x) if entry["kind"] == "text_embeds" else x
        times = timed(lambda: backend.run(feeds), repeats=iterations, warmup=warmup)
        rows.append(_row(b["name"], b, _stats_ms(times), "onnxruntime-cpu", metric="CPU latency"))
    return rows


def profile_logs(paths: list[Path], manifest: dict | None) -> list[dict]:
    buckets = {b["name"]: b for b in manifest["vision"]["buckets"]} if manifest else {}
    rows = []
    for path in paths:
        if not path.exists():
            raise VlmpruneError(f"log {path} does not exist", "check the path")
        s = parse_file(path)
        if not s.has_summary:
            raise VlmpruneError(f"{path} has no trtexec performance summary",
                                "run trtexec without --exportProfile, or add --separateProfileRun")
        g = s.stats["gpu_compute"]
        stats = {"min": g.min, "max": g.max, "mean": g.mean, "median": g.median,
                 **{f"p{k}": v for k, v in g.percentiles.items()}}
        name = path.stem.replace(".profile", "")
        rows.append(_row(name, buckets.get(name), stats, str(path), metric="GPU compute time",
                         trt_version=s.trt_version, throughput_qps=s.throughput_qps))
    return rows


def profile_trt(bundle, manifest: dict, iterations: int, warmup: int, engines_key: str | None,
                trtexec: str, logs: Path) -> list[dict]:  # pragma: no cover - needs TensorRT and a GPU
    names = bundle.engine_names()
    if not names:
        raise VlmpruneError(f"{bundle.folder} has no TensorRT engines", "build them with `prune-build` first")
    engines = bundle.engines(engines_key or names[-1])
    if shutil.which(trtexec) is None:
        raise VlmpruneError(f"{trtexec} was not found on PATH", "install TensorRT or use --from-log / --backend ort")
    logs.mkdir(parents=True, exist_ok=True)
    paths = []
    # a comma list on every target: 8.5's sampleOptions.cpp splits --percentile on commas as 10.x does
    pct = ",".join(map(str, PERCENTILES))
    for name, rel in engines.meta["files"].items():
        if name in ("decoder", "text_encoder"):
            continue
        cmd = [trtexec, f"--loadEngine={engines.path(rel)}", f"--iterations={iterations}", f"--warmUp={warmup}",
               f"--percentile={pct}", "--useSpinWait"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        path = logs / f"{name}.log"
        path.write_text(done.stdout + done.stderr)
        paths.append(path)
    return profile_logs(paths, manifest)


def write_outputs(rows: list[dict], out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    cols = ["name", "method", "keep", "k", "min", "p10", "median", "mean", "max"] + [f"p{p}" for p in PERCENTILES]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) and c not in ("keep",) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "profile.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    written = [out / "profile.md", out / "profile.json", out / "profile.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no profile.png (pip install "vlmprune[plot]")', file=sys.stderr)
        return written
    fig = profile_figure(plt, rows, title)
    fig.savefig(out / "profile.png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return written + [out / "profile.png"]


def series_name(row: dict) -> str:
    """The bucket's name without its ``-k<K>`` tail: the series the bucket belongs to."""
    name = str(row.get("name", row.get("method")))
    stem, sep, k = name.rpartition("-k")
    return stem if sep and k.isdigit() else name


def profile_figure(plt, rows: list[dict], title: str):
    """Median per bucket with p10-p90 whiskers (min-p90 for trtexec logs, which print no p10), y from zero, one
    colour per method (``vlmprune.palette``), so run-to-run noise is visible as such."""
    from vlmprune.palette import method_color

    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)  # the dpi it is saved at
    metric = rows[0].get("metric", "latency")
    low = "p10" if all("p10" in r for r in rows) else "min"
    high = "p90" if all("p90" in r for r in rows) else "max"  # TensorRT 8.x prints p99 only

    def whiskers(rs):
        return [[r["median"] - r[low] for r in rs], [r[high] - r["median"] for r in rs]]

    keyed = [r for r in rows if r.get("keep") is not None]
    if keyed:
        # One line per bucket series: the bucket name without its "-k<K>" tail ("fopru", or "fopru-2x2" where a
        # bundle has several series per method), so buckets of different series are never joined into one line.
        series = list(dict.fromkeys((r["method"], series_name(r)) for r in keyed))
        markers, styles = "osD^vP*X", ["-", "--", ":", "-."]
        for method, stem in series:
            mine = sorted((r for r in keyed if (r["method"], series_name(r)) == (method, stem)), key=lambda r: r["keep"])
            siblings = [s for m, s in series if m == method]
            i = siblings.index(stem)
            label = (stem if len(siblings) > 1 else method) + (" (unpruned)" if method == "none" else "")
            ax.errorbar([r["keep"] for r in mine], [r["median"] for r in mine], yerr=whiskers(mine),
                        marker=markers[i % len(markers)], linestyle=styles[i % len(styles)], capsize=3,
                        color=method_color(method), label=label)
        ax.set_xlabel("keep ratio")
        many = len(series) > 6
        ax.legend(fontsize=7 if many else 8, ncol=2 if many else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    else:
        ax.bar([r["name"] for r in rows], [r["median"] for r in rows], yerr=whiskers(rows), capsize=3,
               color=[method_color(r["method"]) if r.get("method") else "#7f7f7f" for r in rows])
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"{metric} (ms)\nmedian, whiskers {low} to {high}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _parser():
    p = argparse.ArgumentParser(
        prog="prune-profile", formatter_class=HelpFormatter,
        description="Latency of each bucket's engine or graph against its keep ratio: --backend trt runs trtexec on "
                    "the bundle's engines, --backend ort times the ONNX Runtime graphs here, --from-log parses saved "
                    "trtexec logs. Writes profile.md, .json, .csv and profile.png (median with p10-p90 whiskers).")
    p.add_argument("bundle", type=Path, nargs="?", help="bundle folder (optional with --from-log)")
    p.add_argument("--backend", choices=["trt", "ort"], default="trt",
                   help="trt: trtexec on the engines from prune-build (GPU compute time); ort: ONNX Runtime on this "
                        "machine (wall time per run)")
    p.add_argument("--from-log", type=Path, nargs="+", metavar="LOG",
                   help="parse saved trtexec logs instead of running; a log named after a bucket (fopru-k144.log, "
                        "or fopru-k144.profile.log) is matched to that bucket's method and keep ratio when BUNDLE is "
                        "given, others are plotted by file name")
    p.add_argument("--iterations", type=int, default=100, help="timed runs per bucket")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs (ort) or milliseconds (trtexec --warmUp)")
    p.add_argument("--engines", help="which engines of the manifest, e.g. trt10-fp16 (default: the last built)")
    p.add_argument("--trtexec", default="trtexec", help="trtexec executable")
    p.add_argument("--out", type=Path, help="output folder (default: BUNDLE/profile or ./profile)")
    return p


@main_wrapper("prune-profile")
def main(argv=None):
    args = _parser().parse_args(argv)
    manifest = bundle = None
    if args.bundle is not None:
        from vlmprune.bundle import Bundle

        bundle = Bundle.open(args.bundle)
        manifest = bundle.manifest
    elif not args.from_log:
        raise VlmpruneError("no bundle given", "pass BUNDLE, or --from-log FILE ... to parse saved trtexec logs")
    if args.iterations < 1:
        raise VlmpruneError(f"--iterations {args.iterations} must be at least 1", "e.g. --iterations 100")
    if args.warmup < 0:
        raise VlmpruneError(f"--warmup {args.warmup} must be 0 or more", "e.g. --warmup 10")
    own = args.out is None and bundle is not None  # the bundle's profile/, never part of a checked set
    out = Path(os.path.abspath(args.out or ((args.bundle / "profile") if args.bundle else Path("profile"))))
    if out.exists() and not out.is_dir():
        raise VlmpruneError(f"--out {args.out} is a file", "give a folder for the profile outputs")
    # Outputs are made in a temporary folder, then the bundle's own profile/ is replaced in one step; a folder the
    # user named gets each file replaced atomically and keeps whatever else it holds.
    work = out.parent if own else out
    ensure_folder(work, "--out")
    with DirLock(work, "profile", str(out)):
        clean_leftovers(work)
        tmp = make_temp_dir(work, "profile")
        try:
            if args.from_log:
                rows, title = profile_logs(args.from_log, manifest), "trtexec GPU compute time (from logs)"
            elif args.backend == "ort":
                rows = profile_ort(bundle, manifest, args.iterations, args.warmup)
                title = "ONNX Runtime CPU latency"
            else:
                rows = profile_trt(bundle, manifest, args.iterations, args.warmup, args.engines, args.trtexec,
                                   tmp / "logs")
                title = "TensorRT GPU compute time"
            made = write_outputs(rows, tmp, title)
            if own:
                old = swap_dirs(tmp, out)
                if old is not None:
                    remove_temp(old)
            else:
                for path in sorted(tmp.rglob("*")):
                    if path.is_file():
                        dest = out / path.relative_to(tmp)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, dest)
                remove_temp(tmp)
        except BaseException:
            remove_temp(tmp)
            raise
    written = [out / p.relative_to(tmp) for p in made]
    print((out / "profile.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
