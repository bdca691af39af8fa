"""``prune-build``: TensorRT engines for a bundle, one per bucket (and the text encoder, optionally the decoder).

Two ways to build, same settings: ``--via trtexec`` (command lines, printable with ``--dry-run``) and ``--via api``
(the TensorRT Python API). Precision per target follows ``specs/tensorrt.md``:
- weakly typed targets (8.5, 8.6, 10.x): ``--fp16``/``--int8``/``--best`` with the pruning subgraph and every
  LayerNorm pinned to fp32 by layer precision constraints, on the layers that compute floats only (a layer computing
  booleans or indices takes no fp32 precision or output type: TensorRT rejects it);
- TensorRT 11: the weak flags are gone (10.12-10.16 still have them, deprecated); only ``--stronglyTyped`` builds
  of an ONNX whose own dtypes say what runs in which precision (fp32 bundles, or the Q/DQ graph from
  ``prune-calibrate``).
INT8 is for the vision buckets (calibrated: a cache on 8.x, the Q/DQ graph on 10.x/11); the text encoder and the
decoder, which have no calibration, build at fp16 in an int8 build.
A real build first checks ``--target`` against the TensorRT that will build (trtexec's banner, or the Python
module): the option sets differ per version (``targets.py``).
Engine metadata (TensorRT version, GPU, compute capability, precision) goes into the manifest; the runtime refuses
an engine built for another TensorRT version or GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmprune.atomic import DirLock, clean_leftovers, make_temp_dir, remove_temp, swap_dirs
from vlmprune.bundle import Bundle
from vlmprune.cli_common import HelpFormatter, main_wrapper
from vlmprune.integrity import make_record, write_record
from vlmprune.errors import VlmpruneError
from vlmprune.runtime.trt_profile import decoder_profile, shape_strings, text_encoder_profile

from .targets import TARGETS, Target, check_target, get_target, parse_trt_version

PRECISIONS = ("fp32", "fp16", "int8", "best")
# Layers kept in fp32: the pruning subgraph (module scope /method/), every LayerNorm (CLIP's pre-norm is spelled
# "pre_layrnorm"), and the softmax/reductions that feed top-k. Matched on ONNX node names, which TensorRT's parser
# uses as layer names.
_PIN = re.compile(r"(^|/)method/|layer_?norm|layrnorm|LayerNormalization", re.IGNORECASE)


@dataclass
class EngineJob:
    name: str  # bucket name, "text_encoder" or "decoder"
    onnx: Path
    engine: Path
    pinned: list[str] = field(default_factory=list)  # layers given fp32 precision
    pinned_outputs: list[str] = field(default_factory=list)  # layers whose outputs are constrained to fp32
    precision: str | None = None  # this job's own precision when it differs from the build's
    shapes: dict[str, str] = field(default_factory=dict)  # min/opt/max for dynamic inputs
    calib_cache: Path | None = None


def fp32_pattern(manifest: dict | None) -> re.Pattern:
    """The layers to keep in fp32, as the model family declared them in the manifest (``vision.fp32_scopes``, checked
    to be regular expressions when the bundle opened; version 2 bundles' family scopes are moved there on reading);
    bundles written before families recorded them get LLaVA-1.5's scopes."""
    scopes = ((manifest or {}).get("vision") or {}).get("fp32_scopes")
    if not scopes:
        return _PIN
    return re.compile("|".join(f"(?:{s})" for s in scopes), re.IGNORECASE)


def pinned_layers(onnx_path: Path, pattern: re.Pattern = _PIN) -> list[str]:
    from .onnx_nodes import read_nodes  # onnx where installed; the edge install reads the names without it

    return [name for name, op in read_nodes(onnx_path)
            if name and (pattern.search(name) or op in ("LayerNormalization", "SimplifiedLayerNormalization"))]


@dataclass
class Pins:
    """The fp32 pins of one graph. TensorRT takes a precision only on a layer that computes floats, and an output
    type only on float outputs: ``setOutputType`` cannot be used on TopK's index output (NvInfer.h, ILayer), and a
    fp32 precision on a layer that computes booleans fails network validation. So a scope node whose outputs are all
    float gets both, TopK (float values, int32 indices) gets the precision only, and the rest (comparisons, logic,
    index reshapes) gets nothing: it computes no float to protect."""

    precisions: list[str]
    output_types: list[str]
    skipped: list[str]


def fp32_pins(onnx_path: Path, pattern: re.Pattern = _PIN) -> Pins:
    from .onnx_nodes import FLOAT_TYPES, read_node_types

    pins = Pins([], [], [])
    for name, op, types in read_node_types(onnx_path):
        if not name or not (pattern.search(name) or op in ("LayerNormalization", "SimplifiedLayerNormalization")):
            continue
        if types and all(t in FLOAT_TYPES for t in types):
            pins.precisions.append(name)
            pins.output_types.append(name)
        elif op == "TopK" and types and types[0] in FLOAT_TYPES:
            pins.precisions.append(name)
        else:
            pins.skipped.append(name)
    return pins


SELECTION_OPS = ("TopK",)  # only the pruning selects: a TopK outside the pinned layers means the scopes missed it


def unpinned_selection(onnx_path: Path, pattern: re.Pattern) -> list[str]:
    """Selection nodes of a vision graph that the fp32 pattern does not pin: a bundle exported before its family's
    scopes covered its graph (LLaVA-NeXT's anyres graphs before version 3) would have its pruning reduced."""
    from .onnx_nodes import read_nodes

    pinned = set(pinned_layers(onnx_path, pattern))
    return [name for name, op in read_nodes(onnx_path) if op in SELECTION_OPS and name not in pinned]


def unpinned_note(name: str, nodes: list[str]) -> str:
    return (f"note: bucket {name}'s pruning ({nodes[0]}, ...) is outside the family's fp32 scopes, so its selection "
            "runs in reduced precision; re-export the bundle with this vlmprune to pin it")


def decoder_shapes(manifest: dict) -> dict[str, str]:
    """Optimisation profile from the manifest, as trtexec shape strings: the runtime's definition
    (``runtime/trt_profile.py``), which the TensorRT decoder checks its engine against. One profile covers prefill
    (S up to C) and decode (P up to C - 1): min/opt from decode, max both maxima."""
    return shape_strings(decoder_profile(manifest["decoder"]))


def plan_jobs(bundle: Path, manifest: dict, target: Target, precision: str, decoder: bool) -> list[EngineJob]:
    out_dir = bundle / "engines" / f"{target.name}-{precision}"
    jobs = []
    pattern = fp32_pattern(manifest)
    for b in manifest["vision"]["buckets"]:
        pins = fp32_pins(bundle / b["file"], pattern)
        job = EngineJob(b["name"], bundle / b["file"], out_dir / f"{b['name']}.engine",
                        pins.precisions, pins.output_types)
        if precision == "int8":
            # TensorRT 10.x and 11 build the Q/DQ graph (implicit quantisation is deprecated from 10.0 and gone in
            # 11); 8.x reads calibration caches, which prune-calibrate writes on a device with TensorRT 8.x
            if target.trt_version >= (10, 0):
                job.onnx = _qdq_path(bundle, b)
            else:
                job.calib_cache = bundle / "int8" / "calib" / f"{b['name']}.cache"
        jobs.append(job)
    # The text encoder and the decoder have no calibration: --int8 without one makes trtexec calibrate on random
    # data (RndInt8Calibrator, sampleEngines.cpp), a garbage engine, so a weakly typed int8 build makes them fp16. Strongly typed (11): their
    # own dtypes.
    weak_int8 = precision in ("int8", "best") and target.trt_version < (11, 0)
    side = "fp16" if weak_int8 else None
    if manifest.get("text_encoder"):
        te = manifest["text_encoder"]
        jobs.append(EngineJob("text_encoder", bundle / te["file"], out_dir / "text_encoder.engine",
                              shapes=shape_strings(text_encoder_profile(te)), precision=side))
    if decoder:
        quant = manifest["decoder"].get("quantization")
        if quant:  # MatMulNBits is an ONNX Runtime contrib op; TensorRT has no parser for it
            raise VlmpruneError(
                f"the bundle's decoder is int{quant['bits']} weight-only (ONNX Runtime's MatMulNBits), which TensorRT "
                "cannot build", "re-export with --decoder-precision fp16 for a TensorRT decoder, or drop --decoder")
        jobs.append(EngineJob("decoder", bundle / manifest["decoder"]["file"], out_dir / "decoder.engine",
                              shapes=decoder_shapes(manifest), precision=side))
    return jobs


def _qdq_path(bundle: Path, bucket: dict) -> Path:
    """Where prune-calibrate puts a bucket's Q/DQ graph (its own int8/ folder, see calibrate/cli.py)."""
    return bundle / "int8" / "qdq" / bucket["file"].replace(".onnx", ".qdq.onnx")


def trtexec_command(job: EngineJob, target: Target, precision: str, workspace_mib: int,
                    timing_cache: Path | None = None, trtexec: str = "trtexec", bundle_precision: str = "fp32") -> list[str]:
    """The exact trtexec argv for one engine on one target."""
    precision = job.precision or precision
    strongly_typed = target.trt_version >= (11, 0)
    if strongly_typed and precision == "best" or strongly_typed and precision == "fp16" and bundle_precision != "fp16":
        raise VlmpruneError(
            f"{target.name} has no weakly typed --{precision}: it builds strongly typed networks only",
            "for an fp16 engine export the bundle with `prune-export --precision fp16` (fp32 islands in the graph), "
            "or build fp32 / int8 (Q/DQ)",
        )
    cmd = [trtexec, f"--onnx={job.onnx}", f"--saveEngine={job.engine}", f"--memPoolSize=workspace:{workspace_mib}"]
    cmd.append("--buildOnly" if target.trt_version < (8, 6) else "--skipInference")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if job.shapes:
        cmd += [f"--minShapes={job.shapes['min']}", f"--optShapes={job.shapes['opt']}", f"--maxShapes={job.shapes['max']}"]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    elif precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]
        if job.calib_cache is not None:
            cmd.append(f"--calib={job.calib_cache}")
    elif precision == "best":
        cmd.append("--best")
    if precision == "fp32":
        cmd.append("--noTF32")  # Ampere/Orin run fp32 in TF32 by default; parity needs true fp32
    if job.pinned and not strongly_typed and precision != "fp32":
        cmd += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in job.pinned)]
        if job.pinned_outputs:
            cmd.append("--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in job.pinned_outputs))
    return cmd


# --- building ------------------------------------------------------------------------------------------------------


def _gpu_from_trtexec_log(text: str) -> dict:
    from vlmprune.runtime.trtexec_log import parse

    s = parse(text)
    cc = re.search(r"Compute Capability:\s*([\d.]+)", text)
    return {"trt_version": s.trt_version, "gpu": s.device, "compute_capability": cc.group(1) if cc else None}


def build_with_trtexec(job: EngineJob, cmd: list[str], log_dir: Path) -> dict:
    if shutil.which(cmd[0]) is None:
        raise VlmpruneError(f"{cmd[0]} was not found on PATH",
                            "install TensorRT (on Jetson: /usr/src/tensorrt/bin) or use --dry-run to print the commands")
    job.engine.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    (log_dir / f"{job.name}.build.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise VlmpruneError(f"trtexec failed for {job.name}: {tail[0][:200]}", f"see {log_dir / (job.name + '.build.log')}")
    return _gpu_from_trtexec_log(done.stdout)


def installed_tensorrt(via: str, trtexec: str) -> tuple[tuple[int, int, int], str]:
    """The TensorRT version that will build, and what said so: trtexec's banner (``reportTestStart`` prints
    ``[TensorRT vNNNN]`` before it parses any option), or the Python module's ``__version__``. Checked before anything
    is printed or created."""
    from vlmprune.runtime.gpu import trt_install_fix

    if via == "api":
        try:
            import tensorrt as trt
        except ImportError:
            raise VlmpruneError("the TensorRT Python package is not installed",
                                f"{trt_install_fix()}, or use --via trtexec / --dry-run") from None
        version = parse_trt_version(str(trt.__version__))
        if version is None:
            raise VlmpruneError(f"cannot read the TensorRT version {trt.__version__!r}", trt_install_fix())
        return version, "the tensorrt Python module"
    exe = shutil.which(trtexec)
    if exe is None:
        raise VlmpruneError(f"{trtexec} was not found on PATH",
                            "install TensorRT (on Jetson: /usr/src/tensorrt/bin) or use --dry-run to print the commands")
    try:
        done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VlmpruneError(f"{trtexec} --help failed ({type(exc).__name__})", "check the trtexec installation") from None
    version = parse_trt_version(done.stdout + done.stderr)
    if version is None:
        raise VlmpruneError(f"{trtexec} printed no TensorRT version banner ([TensorRT vNNNN])",
                            "give TensorRT's own trtexec with --trtexec")
    return version, trtexec


def build_with_api(job: EngineJob, target: Target, precision: str, workspace_mib: int,
                   timing_cache: Path | None) -> dict:
    import tensorrt as trt  # installed_tensorrt checked it, and that --target matches its version

    precision = job.precision or precision
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # EXPLICIT_BATCH: required on 8.x, deprecated in 10, gone in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = target.trt_version >= (11, 0)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):  # reads the external weights next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VlmpruneError(f"TensorRT cannot parse {job.onnx.name}: {errors[:300]}", "check the lint in the manifest")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision in ("int8", "best"):
            config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned, outputs = set(job.pinned), set(job.pinned_outputs)  # float layers only (Pins)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in pinned:
                layer.precision = trt.float32
            if layer.name in outputs:
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
        if precision == "int8" and job.calib_cache is not None:
            from polygraphy.backend.trt import Calibrator

            # reads the cache only; Polygraphy's default base class is IInt8EntropyCalibrator2, the one
            # prune-calibrate writes with (calibrate/cache.py)
            config.int8_calibrator = Calibrator(data_loader=[], cache=str(job.calib_cache),
                                                BaseClass=trt.IInt8EntropyCalibrator2)
    if job.shapes:
        profile = builder.create_optimization_profile()
        specs = {k: dict(p.split(":") for p in v.split(",")) for k, v in job.shapes.items()}
        for name in specs["min"]:
            dims = [tuple(int(x) for x in specs[k][name].split("x")) for k in ("min", "opt", "max")]
            profile.set_shape(name, *dims)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VlmpruneError(f"TensorRT could not build {job.name}", "rerun with a larger --workspace or see the log")
    job.engine.parent.mkdir(parents=True, exist_ok=True)
    job.engine.write_bytes(bytes(serialized))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    from vlmprune.runtime.trt_backend import current_device

    return {"trt_version": trt.__version__, **current_device()}


def _parser():
    p = argparse.ArgumentParser(
        prog="prune-build", formatter_class=HelpFormatter,
        description="Build TensorRT engines for a vlmprune bundle: one per bucket, the text encoder, optionally the "
                    "decoder; the pruning subgraph and every LayerNorm stay fp32. --dry-run prints the trtexec command "
                    "lines and needs neither TensorRT nor onnx.")
    p.add_argument("bundle", type=Path, help="bundle folder written by prune-export")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="engine precision; int8 needs prune-calibrate first (Q/DQ graphs, or caches for TensorRT 8.x), "
                        "best lets TensorRT choose per layer (weakly typed targets only)")
    p.add_argument("--target", default="trt10", help=f"one of {', '.join(TARGETS)}, a comma list, or 'all' (dry run)")
    p.add_argument("--workspace", type=int, default=2048, help="builder workspace in MiB (Orin Nano: keep <= 2048)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file, reused across builds")
    p.add_argument("--via", default="trtexec", choices=["trtexec", "api"],
                   help="build with the trtexec binary, or with the TensorRT Python API (needs the trt extra)")
    p.add_argument("--decoder", action="store_true", help="also build the decoder (optimisation profile from the manifest)")
    p.add_argument("--trtexec", default="trtexec", help="trtexec executable")
    p.add_argument("--dry-run", action="store_true", help="print the trtexec command lines and build nothing")
    return p


@main_wrapper("prune-build")
def main(argv=None):
    args = _parser().parse_args(argv)
    opened = Bundle.open(args.bundle)
    bundle, manifest = opened.folder, opened.manifest
    if args.precision == "int8" and not args.dry_run:
        opened.int8()  # Q/DQ graphs and caches are read only once their own record checks out
    names = list(TARGETS) if args.target == "all" else [t.strip() for t in args.target.split(",") if t.strip()]
    targets = [get_target(n) for n in names]
    if args.workspace < 64:
        raise VlmpruneError(f"--workspace {args.workspace} MiB is too small", "give at least 64 MiB")
    if not args.dry_run and len(targets) != 1:
        raise VlmpruneError("build one target at a time (engines are tied to the TensorRT on this machine)",
                            "pass a single --target; several or 'all' work with --dry-run")
    if args.precision != "fp32":
        for b in manifest["vision"]["buckets"]:
            missed = unpinned_selection(bundle / b["file"], fp32_pattern(manifest))
            if missed:
                print(unpinned_note(b["name"], missed), file=sys.stderr)
    for target in targets:
        try:
            _check_lint(manifest, target)
        except VlmpruneError as exc:
            if not args.dry_run:
                raise
            print(f"# {target.name}: skipped, {exc}")
            continue
        jobs = plan_jobs(bundle, manifest, target, args.precision, args.decoder)
        _check_inputs(jobs, args.precision, target, dry_run=args.dry_run, bundle=bundle)
        if not args.dry_run:  # before anything is printed or created
            version, where = installed_tensorrt(args.via, args.trtexec)
            check_target(target, version, where)
        if args.dry_run:
            try:
                lines = [shlex.join(trtexec_command(job, target, args.precision, args.workspace, args.timing_cache,
                                                    args.trtexec, manifest.get("precision", "fp32"))) for job in jobs]
            except VlmpruneError as exc:
                print(f"# {target.name}: skipped, {exc}")
                continue
            print(f"# {target.name} ({target.jetpack or 'x86/dGPU'}), precision {args.precision}")
            print("\n".join(lines))
            continue
        _build(opened, jobs, target, args)
    return 0


def _check_lint(manifest: dict, target: Target) -> None:
    for graph, per_target in manifest.get("lint", {}).items():
        entry = per_target.get(target.name)
        if entry is not None and not entry["ok"]:
            rule = next(f["rule"] for f in entry["findings"] if f["level"] == "error")
            raise VlmpruneError(f"{graph} fails the {target.name} lint ({rule})",
                                f"re-export with `prune-export --target {target.name}`")


def _check_inputs(jobs: list[EngineJob], precision: str, target: Target, dry_run: bool, bundle: Path) -> None:
    """INT8 needs prune-calibrate's outputs: an error for a build, a warning for a dry run (whose commands name
    files that do not exist yet)."""
    if precision != "int8":
        return
    missing = [p for p in (job.calib_cache if job.calib_cache is not None else job.onnx
                           for job in jobs if job.name not in ("decoder", "text_encoder")) if not p.exists()]
    if not missing:
        return
    names = ", ".join(p.relative_to(bundle).as_posix() for p in missing)
    # Q/DQ graphs are written by every prune-calibrate; calibration caches only where TensorRT 8.x and its GPU are
    # (calibrate/cache.py), so the fix names the machine to run it on
    where = " on the device, with TensorRT 8.x and its GPU (the caches need them)" if target.trt_version < (10, 0) else ""
    fix = f"run `prune-calibrate {bundle} --images DIR`{where}"
    if dry_run:
        verb = "does" if len(missing) == 1 else "do"
        print(f"prune-build: warning: {target.name} int8: {names} {verb} not exist yet; {fix} before running these "
              "commands", file=sys.stderr)
        return
    raise VlmpruneError(f"INT8 for {target.name} needs {names}", fix)


def _build(opened: Bundle, jobs: list[EngineJob], target: Target, args) -> None:
    """Engines go to a temporary folder, get their own record (with the TensorRT/GPU metadata), and replace
    ``engines/<target>-<precision>/`` in one step; the export's record and manifest are never rewritten."""
    final = jobs[0].engine.parent
    created = not final.parent.exists()
    final.parent.mkdir(exist_ok=True)
    try:
        _build_into(opened, jobs, target, args, final)
    except BaseException:
        if created:  # a failed first build leaves no empty engines/ folder behind
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        raise


def _build_into(opened: Bundle, jobs: list[EngineJob], target: Target, args, final: Path) -> None:
    with DirLock(final.parent, final.name, str(final)):
        for line in clean_leftovers(final.parent):
            print(line, file=sys.stderr)
        tmp = make_temp_dir(final.parent, final.name)
        try:
            entries, meta = {}, {}
            for n, job in enumerate(jobs, 1):
                job.engine = tmp / job.engine.name
                print(f"[{n}/{len(jobs)}] building {job.name} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                if args.via == "trtexec":
                    meta = build_with_trtexec(job, trtexec_command(job, target, args.precision, args.workspace,
                                                                   args.timing_cache, args.trtexec,
                                                                   opened.manifest.get("precision", "fp32")), tmp)
                else:
                    meta = build_with_api(job, target, args.precision, args.workspace, args.timing_cache)
                print(f"[{n}/{len(jobs)}] {job.name} built in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
                entries[job.name] = job.engine.name
            info = {"target": target.name, "precision": args.precision, "for_manifest": opened.manifest_sha,
                    "files": entries, **{k: v for k, v in meta.items() if v is not None}}
            write_record(tmp, make_record(tmp, written_by="prune-build", meta=info))
            old = swap_dirs(tmp, final)
            if old is not None:
                remove_temp(old)
        except BaseException:
            remove_temp(tmp)
            raise
    print(f"engines in {final} (TensorRT {meta.get('trt_version')}, {meta.get('gpu')})")
