"""``prune-selftest``: the GPU path end to end on this device, in one command; its table is what a bug report attaches.

Per tiny preset (one per model family), through the public commands:
1. export it (FoPru, keep 0.25; needs the export extra, else ``--bundles DIR`` of tiny bundles exported elsewhere);
2. the reference: ``prune-run --provider cpu --json`` (ONNX Runtime fp32) and its kept indices;
3. ``prune-build`` fp16 engines for the installed TensorRT (``--target`` read from trtexec's banner);
4. ``prune-calibrate`` on synthetic images, then ``prune-build --precision int8``;
5. ``prune-run --engines KEY --require-gpu --json``: the kept indices of the fp16 engines against the reference
   (overlap per bucket);
6. ``prune-profile --backend trt`` (trtexec timings).
A part that cannot run here is skipped with its reason (no GPU, no trtexec, ...). Prints one table and writes it as
JSON (``--json-out``). Exit 1 when a part that ran failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vlmprune.cli_common import HelpFormatter, main_wrapper
from vlmprune.errors import VlmpruneError

PRESETS = ("tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl")
METHOD, KEEP = "fopru", 0.25
PROMPT = "What is in the picture?"
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


@dataclass
class Row:
    preset: str
    step: str
    status: str  # ok | skip | fail
    detail: str
    seconds: float = 0.0


def _call(entry, argv: list[str]) -> tuple[int, str, str]:
    """A command's ``run(argv)`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry.run(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _last_line(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[-1][:200] if lines else "(no output)"


def _image(folder: Path, seed: int = 0) -> Path:
    """A synthetic photo-like picture (smooth gradients and blobs): deterministic, no download."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:336, 0:448] / 336.0
    img = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)), np.cos(y * rng.uniform(2, 9)),
                    np.sin((x + y) * rng.uniform(2, 9))], -1)
    path = folder / f"image{seed:03d}.png"
    Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(path)
    return path


def _overlap(ref: list[int], got: list[int]) -> float:
    return len(set(ref) & set(got)) / max(len(ref), 1)


class SelfTest:
    def __init__(self, out: Path, trtexec: str, bundles: Path | None):
        self.out, self.trtexec, self.bundles = out, trtexec, bundles
        self.rows: list[Row] = []

    def step(self, preset: str, name: str, fn):
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except VlmpruneError as exc:
            status, detail = "fail", f"{exc}"[:200]
        self.rows.append(Row(preset, name, status, detail, round(time.perf_counter() - t0, 1)))
        return status

    def machine(self) -> tuple[str | None, str | None, str | None]:
        """(target name, why TensorRT parts skip, why GPU parts skip)."""
        from vlmprune.runtime.gpu import detect_gpu

        from .targets import target_for
        from .trt_build import installed_tensorrt

        gpu = detect_gpu()
        no_gpu = None if gpu.present else "no NVIDIA GPU here (prune-doctor says what is missing)"
        try:
            version, _ = installed_tensorrt("trtexec", self.trtexec)
        except VlmpruneError as exc:
            return None, str(exc), no_gpu
        target = target_for(version)
        if target is None:
            return None, f"TensorRT {'.'.join(map(str, version))} is not a version vlmprune targets", no_gpu
        return target.name, None, no_gpu

    def run(self, presets: list[str]) -> list[Row]:
        from vlmprune.calibrate.cli import main as calibrate_main
        from vlmprune.runtime.cli import run_main
        from vlmprune.runtime.profile_cli import main as profile_main

        from .trt_build import main as build_main

        target, no_trt, no_gpu = self.machine()
        images = self.out / "images"
        images.mkdir(parents=True, exist_ok=True)
        photo = _image(images, 0)
        for i in range(1, 40):
            _image(images, i)
        for preset in presets:
            bundle = self.out / preset if self.bundles is None else self.bundles / preset
            state = {}
            if self.step(preset, "export", lambda: self._export(preset, bundle)) != "ok":
                continue

            def reference():
                code, out, err = _call(run_main, [str(bundle), "--image", str(photo), "--prompt", PROMPT, "--keep",
                                                  str(KEEP), "--provider", "cpu", "--max-new-tokens", "4", "--json"])
                if code:
                    return "fail", _last_line(err)
                state["ref"] = json.loads(out)
                return "ok", f"ONNX Runtime fp32, {len(state['ref']['kept_indices'])} tokens kept"

            self.step(preset, "reference (ORT fp32)", reference)
            key = f"{target or 'TARGET'}-fp16"

            def build(precision):
                if no_trt:
                    return "skip", no_trt
                if precision == "int8":
                    code, _, err = _call(calibrate_main, [str(bundle), "--images", str(images), "--num", "32"])
                    if code:
                        return ("skip" if "refused" in err or "not supported" in err else "fail"), _last_line(err)
                code, out, err = _call(build_main, [str(bundle), "--target", target, "--precision", precision,
                                                    "--trtexec", self.trtexec])
                return ("ok", _last_line(out)) if code == 0 else ("fail", _last_line(err))

            built = self.step(preset, "build fp16", lambda: build("fp16"))
            self.step(preset, "build int8 (calibrated)", lambda: build("int8"))

            def engines_run():
                if built != "ok":
                    return "skip", "no fp16 engines"
                if no_gpu:
                    return "skip", no_gpu
                code, out, err = _call(run_main, [str(bundle), "--image", str(photo), "--prompt", PROMPT, "--keep",
                                                  str(KEEP), "--engines", key, "--require-gpu", "--max-new-tokens", "4",
                                                  "--json"])
                if code:
                    return "fail", _last_line(err)
                got = json.loads(out)
                if "ref" not in state:
                    return "ok", "ran on the GPU (no reference to compare)"
                overlap = _overlap(state["ref"]["kept_indices"], got["kept_indices"])
                return ("ok" if overlap >= 0.9 else "fail"), (f"bucket {got.get('bucket', '?')}: kept-index overlap "
                                                              f"with ORT fp32 {overlap:.3f}")

            self.step(preset, f"prune-run --engines {key} --require-gpu", engines_run)

            def profile():
                if built != "ok":
                    return "skip", "no fp16 engines"
                if no_gpu:
                    return "skip", no_gpu
                code, out, err = _call(profile_main, [str(bundle), "--backend", "trt", "--engines", key,
                                                      "--iterations", "50", "--trtexec", self.trtexec,
                                                      "--out", str(self.out / f"{preset}-profile")])
                return ("ok", _last_line(out)) if code == 0 else ("fail", _last_line(err))

            self.step(preset, "prune-profile --backend trt", profile)
        return self.rows

    def _export(self, preset: str, bundle: Path):
        if self.bundles is not None:
            if not (bundle / "manifest.json").exists():
                return "skip", f"{bundle} has no bundle (export {preset} with --method {METHOD} --keep {KEEP})"
            return "ok", f"given: {bundle}"
        try:
            import torch  # noqa: F401
        except ImportError:
            return "skip", ("the export extra is not installed here: export the tiny presets on a workstation and "
                            "pass --bundles DIR")
        if (bundle / "manifest.json").exists():  # an earlier self-test's: reused, never overwritten
            return "ok", f"reused {bundle}"
        from .exporter import ExportRequest, export_bundle
        from .progress import Steps

        export_bundle(ExportRequest(model=preset, method=METHOD, keeps=[KEEP], out=bundle, validate=False),
                      Steps(quiet=True))
        return "ok", str(bundle)


def table(rows: list[Row]) -> str:
    head = ("preset", "step", "status", "seconds", "detail")
    cells = [head] + [(r.preset, r.step, r.status, f"{r.seconds:.1f}", r.detail) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells)


def _parser():
    p = argparse.ArgumentParser(
        prog="prune-selftest", formatter_class=HelpFormatter,
        description="The GPU path on this device: export the tiny presets, build fp16 and int8 engines for the "
                    "installed TensorRT, compare fp16 kept indices with ONNX Runtime fp32, prune-run --require-gpu, "
                    "profile with trtexec. Parts that cannot run here are skipped with their reason.")
    p.add_argument("--out", type=Path, default=Path("vlmprune-selftest"), help="work folder (bundles, images, profiles)")
    p.add_argument("--json-out", type=Path, help="where to write the table as JSON (default: OUT/selftest.json)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of tiny presets (one per model family)")
    p.add_argument("--bundles", type=Path, help="folder of tiny bundles exported elsewhere, one per preset name")
    p.add_argument("--trtexec", default="trtexec", help="trtexec executable")
    return p


@main_wrapper("prune-selftest")
def main(argv=None):
    args = _parser().parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise VlmpruneError(f"unknown preset {unknown[0]!r}", f"choose from {', '.join(PRESETS)}")
    trtexec = args.trtexec
    if trtexec == "trtexec" and shutil.which(trtexec) is None and Path(JETPACK_TRTEXEC).is_file():
        trtexec = JETPACK_TRTEXEC  # JetPack and the NGC images keep it off PATH
    rows = SelfTest(args.out, trtexec, args.bundles).run(presets)
    print(table(rows))
    path = args.json_out or args.out / "selftest.json"
    from vlmprune.atomic import atomic_write_text

    atomic_write_text(path, json.dumps({"rows": [asdict(r) for r in rows], "python": sys.version.split()[0]},
                                       indent=2) + "\n")
    print(f"written: {path}")
    return 1 if any(r.status == "fail" for r in rows) else 0
