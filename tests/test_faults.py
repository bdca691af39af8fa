"""Fault injection (issue 10): crafted bundles, exports killed at each stage, a full disk, hostile images, prompts
and templates, and derived outputs (profile, calibrate, build) that must never break a bundle.

Every failure must be one line and exit 2 (or a correct result); nothing a command did not create is removed; a
crash leaves the old state or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preset_geometry import preset_tokens, spec_k
from crafting import edit, manifest_of, reseal
from vlmprune import atomic, integrity
from vlmprune.bundle import Bundle
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.models import PRESETS
from vlmprune.runtime.cli import run_main, viz_main
from vlmprune.sample import make_sample_image

PROMPT = "What is next to the red house?"
N, _ = preset_tokens(ExportRequest.model)  # the bundles' preset (prune-export's default model)
SIZE = PRESETS[ExportRequest.model].image_size
NONE, GRIDPRUNE = f"none-k{N}", f"gridprune-k{spec_k(0.25, N)}"  # the gridprune bundle's buckets


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "grid"
    return export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=out, validate=False,
                                       fused_decoder=False), Steps(quiet=True)).path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A second, smaller bundle (fopru, one bucket) to be replaced by exports that get killed."""
    out = tmp_path_factory.mktemp("small") / "b"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out, validate=False, fused_decoder=False),
                         Steps(quiet=True)).path


@pytest.fixture()
def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst, symlinks=True)
    return dst


def one_line_error(capsys, code) -> str:
    """The error is one line, the last on stderr (progress bars and the bucket choice may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line or "Traceback" in line]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("prune-"), lines[-5:]
    return errors[0]


def run(folder, *extra, image="sample", prompt="hi"):
    return run_main.run([str(folder), "--image", str(image), "--prompt", prompt, "--max-new-tokens", "2", *extra])


# --- crafted bundles -----------------------------------------------------------------------------------------------

CRAFTED = {
    "a list": (lambda m: [m], "is not a JSON object"),
    "missing key": (edit(["decoder", "max_context"], KeyError), "decoder.max_context is missing"),
    "schema_version 0": (edit(["schema_version"], 0), "schema_version must be an integer >= 1"),
    "schema_version -1": (edit(["schema_version"], -1), "schema_version must be an integer >= 1"),
    "schema_version true": (edit(["schema_version"], True), "schema_version must be an integer >= 1"),
    "empty bucket list": (edit(["vision", "buckets"], []), r"vision.buckets must have 1\.\.1024 entries"),
    "k beyond N": (lambda m: edit(["vision", "buckets", 1, "k"], N + 1)(m), f"k must be in|more than the {N}"),
    "num_patches": (edit(["vision", "view", "num_patches"], 100), "num_patches is 100, but the grid"),
    "std 0": (edit(["preprocessing", "std"], [0.2, 0, 0.2]), r"preprocessing.std\[1\] must be in \(0"),
    "std nan": (lambda m: edit(["preprocessing", "std"], [0.2, float("nan"), 0.2])(m), "must be a finite number"),
    "eos outside vocab": (edit(["decoder", "eos_token_id"], 10**6), "eos_token_id is 1000000, outside the vocab"),
    "max_context 1": (edit(["decoder", "max_context"], 1), r"decoder.max_context must be in 2\.\."),
    "k as text": (lambda m: edit(["vision", "buckets", 0, "k"], str(N))(m), "k must be an integer"),
    "absolute path": (edit(["prompt", "tokenizer"], "/etc/passwd"), "not a plain relative path"),
    "parent path": (edit(["decoder", "embeddings", "file"], "../../x.npy"), "not a plain relative path"),
    "unrecorded path": (edit(["vision", "buckets", 0, "file"], "other.onnx"), "not in the bundle's integrity record"),
    "unknown key with a path": (edit(["decoder", "extra_file"], "/etc/passwd"), "not a plain relative path"),
    "files naming /etc/passwd": (edit(["files"], {"/etc/passwd": "0" * 64}), "not a plain relative path"),
    "text_embeds without encoder": (edit(["text_encoder"], None), "takes text_embeds, but the bundle has no"),
    "hostile template type": (edit(["prompt", "chat_template"], 5), "chat_template must be a string"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_manifests_get_one_line(copy, capsys, case):
    craft, message = CRAFTED[case]
    reseal(copy, craft(manifest_of(copy)))
    line = one_line_error(capsys, run(copy))
    import re

    assert re.search(message, line), line


def test_crafted_files_and_records(copy, capsys, tmp_path):
    # non-UTF-8 text, a directory, a missing record, a record without files, an edited manifest
    good = (copy / "manifest.json").read_bytes()
    reseal(copy, b"\xff\xfe{}")
    assert "is not UTF-8 text" in one_line_error(capsys, run(copy))
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").mkdir()
    assert "manifest" in one_line_error(capsys, run(copy))
    (copy / "manifest.json").rmdir()
    reseal(copy, good)
    record = (copy / "record.json").read_bytes()
    (copy / "record.json").unlink()
    assert "has no integrity record" in one_line_error(capsys, run(copy))
    (copy / "record.json").write_text(json.dumps({"record_version": 1, "files": {}}))
    assert "lists no files" in one_line_error(capsys, run(copy))
    (copy / "record.json").write_bytes(record)
    manifest = manifest_of(copy)
    manifest["decoder"]["max_context"] = 4096
    (copy / "manifest.json").write_text(json.dumps(manifest))  # edited without updating the record
    assert "does not match the bundle's integrity record" in one_line_error(capsys, run(copy))
    (copy / "manifest.json").write_bytes(good)
    assert run(copy) == 0


def test_symlinks_devices_and_fifos_in_a_bundle(copy, capsys, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "tokenizer.json", outside)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)  # same bytes, but outside the bundle: never read
    assert "leads outside the bundle" in one_line_error(capsys, run(copy))
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to("/dev/zero")
    assert "leads outside the bundle" in one_line_error(capsys, run(copy))
    (copy / "tokenizer.json").unlink()
    os.mkfifo(copy / "tokenizer.json")  # would hang a reader that opened it
    assert "not a regular file" in one_line_error(capsys, run(copy))
    (copy / "tokenizer.json").unlink()
    shutil.copy(outside, copy / "tokenizer.json")
    assert run(copy) == 0


def test_version_1_bundles_are_read_with_their_checksums(copy, capsys):
    manifest = manifest_of(copy)
    files = {rel: e["sha256"] for rel, e in json.loads((copy / "record.json").read_text())["files"].items()
             if rel != "manifest.json"}
    (copy / "record.json").unlink()
    v1 = {**manifest, "schema_version": 1, "files": files, "engines": {"x": {"files": {}}}}
    (copy / "manifest.json").write_text(json.dumps(v1))
    assert Bundle.open(copy).version == 1 and run(copy) == 0
    del v1["files"]  # removing the checksums does not switch the checks off
    (copy / "manifest.json").write_text(json.dumps(v1))
    assert "lists no file checksums" in one_line_error(capsys, run(copy))


def test_engines_records_without_files_or_bucket(copy, capsys):
    b = Bundle.open(copy)

    def engines(meta_files):
        folder = copy / "engines" / "trt10-fp16"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / f"{NONE}.engine").write_bytes(b"\0" * 64)
        meta = {"target": "trt10", "precision": "fp16", "for_manifest": b.manifest_sha, "files": meta_files,
                "trt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
        integrity.write_record(folder, integrity.make_record(folder, written_by="prune-build", meta=meta))

    engines({})
    assert "meta.files is empty" in one_line_error(capsys, run(copy, "--engines", "trt10-fp16"))
    engines({NONE: f"{NONE}.engine"})
    line = one_line_error(capsys, run(copy, "--engines", "trt10-fp16", "--keep", "0.25"))
    assert f"have no engine for bucket {GRIDPRUNE}" in line
    engines({GRIDPRUNE: "../../../etc/passwd"})
    assert "not a plain relative path" in one_line_error(capsys, run(copy, "--engines", "trt10-fp16"))
    assert "has no engines 'trt8'" in one_line_error(capsys, run(copy, "--engines", "trt8"))


def test_quick_check_reads_large_files_only_in_samples(copy, monkeypatch):
    """Issue 9 item 4: starting on a large bundle does not read the weights; size and sampled changes are caught,
    and the full check catches what the samples miss (the documented trade-off)."""
    monkeypatch.setattr(integrity, "SAMPLE_MIN_BYTES", 256 << 10)  # make the tiny weights "large"
    integrity.write_record(copy, integrity.make_record(copy, written_by="prune-export"))
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    Bundle.open(copy, "quick")
    large = {"vision.weights", "decoder.weights", "embed_tokens.npy", "text_encoder.weights"}
    assert large.isdisjoint(hashed) and f"vision_none_k{N}.onnx" in hashed  # graphs are structure: hashed whole
    hashed.clear()
    Bundle.open(copy, "full")
    assert large <= set(hashed)
    weights = copy / "vision.weights"
    original = weights.read_bytes()
    size = len(original)
    middle = integrity.sample_offsets(size)[1] + integrity.SAMPLE_BLOCK + 10  # between two sampled blocks
    assert all(not o <= middle < o + integrity.SAMPLE_BLOCK for o in integrity.sample_offsets(size))
    weights.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1:])
    Bundle.open(copy, "quick")  # the trade-off: a flip outside the samples passes the quick check ...
    with pytest.raises(VlmpruneError, match="vision.weights .* does not match its checksum"):
        Bundle.open(copy, "full")  # ... and the full check finds it
    weights.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(VlmpruneError, match="vision.weights .* does not match"):
        Bundle.open(copy, "quick")
    weights.write_bytes(original + b"\0")
    with pytest.raises(VlmpruneError, match=f"vision.weights .* has {size + 1} bytes, the record says {size}"):
        Bundle.open(copy, "quick")


# --- ownership, two writers, and exports killed at each stage ----------------------------------------------------


def test_force_never_replaces_a_model_or_a_folder_that_is_not_a_bundle(tmp_path, capsys, tiny):
    from vlmprune.export.cli import main as export_main

    model = tmp_path / "model"
    shutil.copytree(tiny.path, model)
    before = sorted(p.name for p in model.iterdir())
    args = ["--method", "fopru", "--keep", "0.25", "--quiet", "--force", "--no-validate", "--no-fused-decoder"]
    for out in (model, tmp_path):  # the model itself, and a folder holding it
        line = one_line_error(capsys, export_main.run(["--model", str(model), "--out", str(out), *args]))
        assert "is (or contains) the model source" in line
    assert sorted(p.name for p in model.iterdir()) == before
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    assert "only a vlmprune bundle" in one_line_error(capsys, export_main.run(["--out", str(docs), *args]))
    assert (docs / "thesis.txt").read_text() == "years of work"
    # a bundle that holds the model (someone put it there) is not replaced either
    out = tmp_path / "bundle"
    assert export_main.run(["--out", str(out), *args]) == 0
    (out / "engines").mkdir()
    shutil.move(str(model), out / "engines" / "model")
    line = one_line_error(capsys, export_main.run(["--model", str(out / "engines" / "model"), "--out", str(out),
                                                    *args]))
    assert "is (or contains) the model source" in line
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert "which is a file" in one_line_error(capsys, export_main.run(["--out", str(file / "b"), *args]))
    assert "names the current folder" in one_line_error(capsys, export_main.run(["--out", ".", *args]))
    assert file.read_text() == "x"


def test_broken_checkpoints_are_one_line(tmp_path, capsys, tiny):
    from vlmprune.export.cli import main as export_main

    model = tmp_path / "model"
    shutil.copytree(tiny.path, model)
    weights = (model / "model.safetensors").read_bytes()
    args = ["--model", str(model), "--method", "fopru", "--keep", "0.25", "--out", str(tmp_path / "b"), "--quiet"]
    (model / "model.safetensors").write_bytes(b"")
    assert "safetensors" in one_line_error(capsys, export_main.run(args))
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "SafetensorError" in one_line_error(capsys, export_main.run(args))
    (model / "model.safetensors").write_bytes(weights)
    (model / "processor_config.json").unlink()
    assert "processor" in one_line_error(capsys, export_main.run(args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_two_writers_cannot_both_succeed(tmp_path, capsys):
    from vlmprune.export.publish import claim

    out = tmp_path / "b"
    with claim(out, force=False):
        with pytest.raises(VlmpruneError, match=r"another vlmprune process \(pid \d+\) is writing --out"):
            with claim(out, force=False):
                pass
        # a second export started now fails at once, before loading anything
        with pytest.raises(VlmpruneError, match="is writing"):
            export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out, validate=False), Steps(quiet=True))
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the lock file goes with its holder


KILL = """
import os, signal, sys
from pathlib import Path
from vlmprune import atomic
from vlmprune.export import exporter, publish
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
stage = sys.argv[2]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if stage == "seal":  # every graph written, the manifest and record about to be
    exporter.write_manifest = die
elif stage == "swap":  # the new bundle exchanged in, the old one not yet removed
    publish.remove_temp = die
elif stage == "fallback":  # no RENAME_EXCHANGE: killed between the two renames
    atomic.USE_RENAMEAT2 = False
    calls = []
    class Os:  # only atomic's renames are counted
        def __getattr__(self, name):
            return getattr(os, name)
        def rename(self, a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            os.rename(a, b)
    atomic.os = Os()
export_bundle(ExportRequest(method="fopru", keeps=[0.5], out=Path(sys.argv[1]), validate=False, force=True,
                            fused_decoder=False), Steps(quiet=True))
"""


@pytest.mark.parametrize("stage", ["seal", "swap", "fallback"])
def test_an_export_killed_at_each_stage_leaves_a_bundle_and_its_leftovers_are_cleaned(small, tmp_path, stage):
    from vlmprune.export.publish import claim

    out = tmp_path / "b"
    shutil.copytree(small, out)
    old_sha = Bundle.open(out).manifest_sha
    done = subprocess.run([sys.executable, "-c", KILL, str(out), stage], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers, "a killed export leaves its temporary folder (and the sidecar naming its dead owner)"
    if stage == "seal":
        assert Bundle.open(out, "full").manifest_sha == old_sha  # the old bundle, untouched
    elif stage == "swap":
        new = Bundle.open(out, "full")
        new_ks = [b["k"] for b in new.manifest["vision"]["buckets"]]
        assert new.manifest_sha != old_sha and new_ks == [N, spec_k(0.5, N)]  # the killed run's --keep 0.5 bundle
    else:
        assert not out.exists() and any(".old-" in n for n in leftovers)  # the two-rename window ...
    with claim(out, force=True) as place:  # ... what the next run does first
        assert place.cleaned
    bundle = Bundle.open(out, "full")
    if stage != "swap":
        assert bundle.manifest_sha == old_sha  # the old bundle, back at its name after the fallback's window
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_killed_preset_writes_are_cleaned_only_when_their_owner_is_dead(tmp_path, monkeypatch):
    from vlmprune.models import presets

    cache = presets.preset_path("tiny-llava").parent
    presets.ensure_preset("tiny-llava")
    script = ("import sys; from pathlib import Path; from vlmprune.atomic import make_temp_dir; "
              "p = make_temp_dir(Path(sys.argv[1]), 'tiny-llava-v1'); (p / 'half.safetensors').write_bytes(b'x'); "
              "print(p.name)")
    dead = subprocess.run([sys.executable, "-c", script, str(cache)], check=True, timeout=60, capture_output=True,
                          text=True).stdout.strip()  # a write killed half-way: its process is gone
    live = atomic.make_temp_dir(cache, "tiny-llava-v1")  # a write in progress (this process): must survive
    stranger = cache / ".tiny-llava-v1.tmp-1-deadbeef"  # the right name but no owner sidecar: not provably ours
    stranger.mkdir()
    assert (cache / dead).is_dir()
    presets.ensure_preset("tiny-llava")  # the next run
    names = {p.name for p in cache.iterdir()}
    assert dead not in names and dead + atomic.OWNER_SUFFIX not in names
    assert {live.name, live.name + atomic.OWNER_SUFFIX, stranger.name} <= names
    atomic.remove_temp(live)
    stranger.rmdir()


def test_a_killed_calibration_leaves_nothing_that_is_checked(copy, tmp_path):
    from vlmprune.calibrate.cli import main as calibrate_main

    script = ("import sys; from pathlib import Path; from vlmprune.atomic import make_temp_dir; "
              "p = make_temp_dir(Path(sys.argv[1]), 'int8'); (p / 'qdq').mkdir(); (p / 'qdq' / 'x.onnx').write_bytes(b'x')")
    subprocess.run([sys.executable, "-c", script, str(copy)], check=True, timeout=60)  # killed half-way
    leftover = [p for p in copy.iterdir() if p.name.startswith(".int8.tmp-")]
    assert len(leftover) == 2  # the folder and its owner sidecar
    Bundle.open(copy, "full")  # not part of any checked set ...
    shutil.rmtree(leftover[0] if leftover[0].is_dir() else leftover[1])
    Bundle.open(copy, "full")  # ... so deleting it breaks nothing
    subprocess.run([sys.executable, "-c", script, str(copy)], check=True, timeout=60)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        make_sample_image(300 + 10 * i, 240).save(images / f"{i}.png")
    assert calibrate_main.run([str(copy), "--images", str(images), "--num", "1", "--holdout", "1"]) == 0
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []  # the next run cleaned up


# --- a full disk ---------------------------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", "injected")


def test_full_disk_in_export_calibrate_profile_and_viz(copy, tmp_path, capsys, monkeypatch):
    from vlmprune.calibrate.cli import main as calibrate_main
    from vlmprune.export.cli import main as export_main
    from vlmprune.runtime import profile_cli

    sha = Bundle.open(copy).manifest_sha
    with monkeypatch.context() as m:
        m.setattr(atomic, "atomic_write_bytes", _enospc)  # the manifest write of the seal step
        code = export_main.run(["--method", "fopru", "--keep", "0.25", "--out", str(copy), "--force", "--quiet",
                                "--no-validate", "--no-fused-decoder"])
    assert "No space left on device" in one_line_error(capsys, code)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        make_sample_image(300 + 10 * i, 240).save(images / f"{i}.png")
    with monkeypatch.context() as m:
        m.setattr(np, "save", _enospc)  # calib/pixel_values.npy
        code = calibrate_main.run([str(copy), "--images", str(images), "--num", "2", "--holdout", "1"])
    assert "No space left on device" in one_line_error(capsys, code)
    with monkeypatch.context() as m:
        m.setattr(profile_cli, "write_outputs", _enospc)
        code = profile_cli.main.run([str(copy), "--backend", "ort", "--iterations", "1", "--warmup", "0"])
    assert "No space left on device" in one_line_error(capsys, code)
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file "
                                                                                    "system", "injected")))
        code = viz_main.run([str(copy), "--image", "sample", "-o", str(tmp_path / "v.png")])
    assert "Read-only file system" in one_line_error(capsys, code)
    assert not (tmp_path / "v.png").exists()
    assert Bundle.open(copy, "full").manifest_sha == sha  # the bundle is as it was
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".") or p.name in ("int8", "profile")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_output_paths_and_counts(bundle, tmp_path, capsys):
    from vlmprune.calibrate.cli import main as calibrate_main
    from vlmprune.runtime.profile_cli import main as profile_main

    viz = ["--image", "sample", "--keep", "0.25"]
    assert "is a folder" in one_line_error(capsys, viz_main.run([str(bundle), *viz, "-o", str(tmp_path)]))
    line = one_line_error(capsys, viz_main.run([str(bundle), *viz, "-o", str(tmp_path / "v.xyz")]))
    assert "unknown picture extension '.xyz'" in line
    file = tmp_path / "file"
    file.write_text("x")
    assert "which is a file" in one_line_error(capsys, viz_main.run([str(bundle), *viz, "-o", str(file / "v.png")]))
    line = one_line_error(capsys, calibrate_main.run([str(bundle), "--images", str(tmp_path), "--holdout", "-1"]))
    assert "--holdout -1 must be 0 or more" in line
    line = one_line_error(capsys, profile_main.run([str(bundle), "--backend", "ort", "--out", str(file / "p")]))
    assert "which is a file" in line
    assert viz_main.run([str(bundle), *viz, "-o", str(tmp_path / "v.jpg")]) == 0
    assert Image.open(tmp_path / "v.jpg").format == "JPEG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "v.jpg"]


# --- derived outputs never invalidate a bundle -------------------------------------------------------------------

FAKE_TRTEXEC = """#!/bin/sh
for a in "$@"; do case "$a" in --saveEngine=*) printf 'engine' > "${a#--saveEngine=}";; esac; done
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec"
echo "[I] TensorRT version: 10.3.0"
echo "[I] Selected Device: Orin"
echo "[I] Compute Capability: 8.7"
"""


def test_profile_calibrate_build_run_in_any_order_keep_the_bundle_usable(copy, tmp_path, capsys):
    from vlmprune.calibrate.cli import main as calibrate_main
    from vlmprune.export.trt_build import main as build_main
    from vlmprune.runtime.profile_cli import main as profile_main
    from vlmprune.runtime.verify_cli import main as verify_main

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        make_sample_image(300 + 10 * i, 240).save(images / f"{i}.png")
    trtexec = tmp_path / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC)
    trtexec.chmod(0o755)
    record = (copy / "record.json").read_bytes()
    manifest = (copy / "manifest.json").read_bytes()
    steps = {
        "profile": lambda: profile_main.run([str(copy), "--backend", "ort", "--iterations", "2", "--warmup", "0"]),
        "calibrate": lambda: calibrate_main.run([str(copy), "--images", str(images), "--num", "2", "--holdout", "1",
                                                 "--algo", "minmax"]),
        "build-dry": lambda: build_main.run([str(copy), "--dry-run", "--precision", "fp16"]),
        "build": lambda: build_main.run([str(copy), "--target", "trt10", "--precision", "fp16",
                                         "--trtexec", str(trtexec)]),
        "run": lambda: run(copy),
        "verify": lambda: verify_main.run([str(copy)]),
    }
    order = ["profile", "calibrate", "profile", "build-dry", "run", "build", "calibrate", "profile", "verify", "run",
             "build", "verify"]
    for name in order:
        assert steps[name]() == 0, (name, capsys.readouterr().err)
        assert (copy / "record.json").read_bytes() == record and (copy / "manifest.json").read_bytes() == manifest
    out = capsys.readouterr().out
    assert "engines/trt10-fp16, int8" in out  # prune-verify checked the derived records too
    b = Bundle.open(copy, "full")
    assert b.int8().meta["qdq"] and b.engines("trt10-fp16").meta["gpu"] == "Orin"
    assert not any(p.name.startswith(".") for p in copy.rglob("*"))  # no temporary leftovers anywhere
    # profiling output is in no checked set: editing it breaks nothing
    (copy / "profile" / "profile.csv").write_text("edited")
    assert run(copy) == 0
    # the engines' own record protects them; the runtime refuses a changed engine before TensorRT is touched
    (copy / "engines" / "trt10-fp16" / f"{NONE}.engine").write_bytes(b"Engine")
    line = one_line_error(capsys, run(copy, "--engines", "trt10-fp16", "--keep", "1.0"))
    assert f"{NONE}.engine" in line and "does not match its checksum" in line
    shutil.rmtree(copy / "engines")  # deleting derived outputs leaves the bundle usable
    shutil.rmtree(copy / "int8")
    assert run(copy) == 0


# --- hostile images, prompts and templates -------------------------------------------------------------------------


def test_hostile_images(bundle, tmp_path, capsys):
    from vlmprune.runtime import preprocess
    from vlmprune.runtime.pipeline import Pipeline

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    for path, message in [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                          (link, "not a regular file"), (tmp_path, "is a folder")]:
        assert message in one_line_error(capsys, run(bundle, image=path))
    pipe = Pipeline(bundle)
    for size in [(10000, 1), (1, 10000), (3000, 1)]:  # 114-byte PNGs that would resize to SIZE x 3.4 million
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        pixels = pipe.preprocess(preprocess.load_image(path))
        assert pixels.shape == (1, 3, SIZE, SIZE) and np.isfinite(pixels).all()
        plain = pipe.preprocess(Image.new("RGB", (SIZE, SIZE), (200, 30, 30)))
        assert np.allclose(pixels[0, :, SIZE // 2, SIZE // 2], plain[0, :, 0, 0], atol=1e-5)
    # the region-only resize agrees with the full resize (where the full one fits in memory)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (7, 1500, 3)).astype(np.uint8))
    full = np.asarray(img.resize(preprocess.shortest_edge_size(img.size, SIZE), Image.Resampling.BICUBIC))
    left = (full.shape[1] - SIZE) // 2
    region = np.asarray(preprocess.resize_then_crop(img, SIZE, "bicubic", (SIZE, SIZE)))
    assert np.array_equal(full[:, left:left + SIZE], region)  # pixel for pixel (tests/test_preprocess_extreme.py)
    # EXIF orientation is applied, as transformers' load_image does
    upright = make_sample_image(480, 360)
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # how the sensor stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "phone.jpg"
    rotated.save(path, quality=95, exif=exif)
    loaded = preprocess.load_image(path)
    assert loaded.size == (480, 360)
    assert np.abs(np.asarray(loaded, float) - np.asarray(upright, float)).mean() < 8


def test_hostile_prompts(bundle, capsys):
    from vlmprune.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle)
    eos = pipe.decoder_spec["eos_token_id"]
    bos = pipe.decoder_spec["bos_token_id"]
    for text in ["</s>", "<s>", "<pad>"]:
        ids = pipe.prompt.encode(f"say {text} now")
        control = pipe.prompt.tokenizer.token_to_id(text)
        assert ids.count(control) == (1 if control == bos else 0), (text, ids)  # only the real BOS
        assert text in pipe.prompt.tokenizer.decode(ids, skip_special_tokens=False)
    assert eos not in pipe.prompt.encode("stop </s>")
    # a normal prompt is tokenized exactly as before (the parity test compares it with the processor)
    assert pipe.prompt.encode(PROMPT) == pipe.prompt.tokenizer.encode(pipe.prompt.render(PROMPT)).ids
    # a prompt that ends with the image: nothing after the image token, still a correct run
    result = pipe.generate(make_sample_image(), "<image>", max_new_tokens=3)
    assert result.tokens_generated >= 1 or result.stop_reason == "eos"
    bad = b"\xff\xfe caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for non-UTF-8 bytes
    for args, message in [(["--prompt", bad], "not valid UTF-8"), (["--temperature", "nan"], "not a finite number"),
                          (["--top-p", "nan"], "outside (0, 1]"), (["--seed", "-1"], "--seed -1"),
                          (["--threads", "0"], "--threads 0 must be at least 1")]:
        argv = [str(bundle), "--image", "sample", "--prompt", "hi", "--max-new-tokens", "2", *args]
        assert message in one_line_error(capsys, run_main.run(argv))
    # original positions must not run past the context: one line, before any graph runs
    long = "sky " * 500  # ~650 tokens with a quarter of the image tokens: fits; ~1080 positions with gaps: does not
    pipe_orig = Pipeline(bundle, positions="original")
    with pytest.raises(VlmpruneError, match="positions reach .* the model's context of 1024"):
        pipe_orig.generate(make_sample_image(), long, keep=0.25)
    assert pipe.generate(make_sample_image(), long, keep=0.25, max_new_tokens=2).tokens_generated >= 1


TEMPLATES = {
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}<image>",
                     "ran for more than"),
    "output bomb": ("{% for a in range(100000) %}{{ 'x' * 50 }}{% endfor %}<image>", "writes more than"),
    "string bomb": ("{{ 'x' * 1000000000 }}<image>", "more than a million characters"),
    "power bomb": ("{{ 10 ** 100000000 }}<image>", "power too large"),
    "format width": ("{{ '{:>999999999}'.format(1) }}<image>", "width of a million"),
    "percent width": ("{{ '%0999999999d' % 1 }}<image>", "width of a million"),
    "center": ("{{ 'x'.center(1000000000) }}<image>", "argument over"),
    "filter width": ("{{ 'x' | center(1000000000) }}<image>", "argument over"),
    "sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}<image>", "unsafe operation"),
    "syntax": ("{% for %}<image>", "does not compile"),
    "undefined call": ("{{ nothing() }}<image>", "failed"),
    "raise_exception": ("{{ raise_exception('no images here') }}", "chat template: no images here"),
    "nothing after the image": ("{{ messages[0]['content'][1]['text'] }}<image>", None),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_hostile_templates(copy, capsys, monkeypatch, case):
    from vlmprune.runtime import template

    monkeypatch.setattr(template, "TIME_LIMIT_S", 0.5)
    source, message = TEMPLATES[case]
    manifest = manifest_of(copy)
    manifest["prompt"]["chat_template"] = source
    reseal(copy, manifest)
    code = run(copy)
    if message is None:
        assert code == 0
    else:
        assert message in one_line_error(capsys, code)
