"""Crafted manifests (issue 26), re-sealed so that the schema and the cross-checks must hold on their own: a
catastrophic-backtracking fp32 scope (it hung prune-build --dry-run), fields that contradict the graphs (a
bucket's K, a view's grid), and the family fields the generic schema leaves to the family (LLaVA-NeXT's
grid_pinpoints, Qwen2.5-VL's patch sizes and auxiliary_clip), checked by plain functions next to the family's
runtime code. Each is one line, never a traceback, a hang or a silent wrong result."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import pytest

from crafting import edit, manifest_of, reseal
from vlmprune.bundle import Bundle
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.manifest import unsafe_pattern


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mh") / "fopru"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out, validate=False, fused_decoder=False),
                         Steps(quiet=True)).path


@pytest.fixture()
def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst, symlinks=True)
    return dst


def test_a_catastrophic_fp32_scope_is_refused_without_hanging(copy):
    """``(.+)+\\x00`` against a long node name backtracks for hours (Python's re has no time limit)."""
    reseal(copy, edit(["vision", "fp32_scopes"], ["(.+)+\x00"])(manifest_of(copy)))
    code = "import sys; from vlmprune.export.trt_build import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, str(copy), "--dry-run", "--target", "trt10"],
                          capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "vision.fp32_scopes[0]" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("pattern, safe", [
    (r"(^|/)method/", True), (r"layer_?norm|layrnorm|LayerNormalization", True),  # the families' own scopes
    (r"norm|ln_q|RMSNorm|SimplifiedLayerNormalization", True), (r"[ab]?c", True),
    (r"(.+)+\x00", False), (r"(a|aa)*b", False), (r"a{1,99}", False), (r"(a)\1", False), (r"(?=x)x", False),
    ("a?" * 9 + "a" * 9, False), ("[x", False),
])
def test_only_the_safe_pattern_form_is_accepted(pattern, safe):
    assert (unsafe_pattern(pattern) is None) is safe


@pytest.mark.parametrize("craft, message", [
    (lambda m: edit(["vision", "buckets", 1, "k"], m["vision"]["buckets"][1]["k"] - 1)(m),
     r"buckets\[1\]\.outputs\[\d\]\.shape has \d+ on axis 1"),
    (lambda m: edit(["vision", "view", "grid"], [m["vision"]["view"]["grid"][0] // 2,
                                                  m["vision"]["view"]["grid"][1] * 2])(m), r"view\.grid.*aspect ratio"),
])
def test_fields_that_contradict_the_graphs_are_refused_on_open(copy, craft, message):
    """A bucket's K against its outputs' token dimension (held since issue 12's shape forms; kept here as the sweep's
    case), and a view's grid against its image's aspect ratio (new: an [8, 32] grid on a square image)."""
    m = manifest_of(copy)
    assert [b["method"] for b in m["vision"]["buckets"]] == ["none", "fopru"]
    reseal(copy, craft(m))
    with pytest.raises(VlmpruneError, match=message):
        Bundle.open(copy)


# --- LLaVA-NeXT: grid_pinpoints ---------------------------------------------------------------------------------------

NEXT = {"resample": "bicubic", "crop_size": [336, 336], "grid_pinpoints": [[336, 672], [672, 336], [672, 672]],
        "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize("pins, message", [
    (KeyError, "must be a list"), ("672x672", "must be a list"), ([], "must be a list"),
    ([[336, "672"]], "not a \\[height, width\\] pair"), ([[336]], "not a \\[height, width\\] pair"),
    ([[336, 500]], "not a multiple of the 336 px view"),
    ([[21504, 21504]], "makes 4096 crops of 336 px, over the 64 allowed"),  # it allocated 5.2 GB before failing
])
def test_next_grid_pinpoints_are_checked(pins, message):
    from vlmprune.models.llava_next.geometry import AnyresPreprocessor

    constants = edit(["grid_pinpoints"], pins)(dict(NEXT))
    with pytest.raises(VlmpruneError, match=message):
        AnyresPreprocessor(constants, 24)
    AnyresPreprocessor(dict(NEXT), 24)  # the real checkpoint's pinpoints pass


# --- Qwen2.5-VL: patch sizes, auxiliary_clip, merge size and grids ----------------------------------------------------

CLIP = {"size": 336, "resample": "bicubic", "rescale_factor": 1 / 255, "mean": [0.48, 0.45, 0.4],
        "std": [0.27, 0.26, 0.28]}


@pytest.mark.parametrize("key, value, message", [
    ("size", 0, "auxiliary_clip.size must be an integer"), ("size", "336", "auxiliary_clip.size must be an integer"),
    ("resample", "sinc", "auxiliary_clip.resample 'sinc' is not one of"),
    ("mean", [math.nan, 0.4, 0.4], "auxiliary_clip.mean must be 3 finite numbers"),
    ("std", [0.0, 0.3, 0.3], "auxiliary_clip.std must be 3 positive"),
    ("rescale_factor", math.inf, "auxiliary_clip.rescale_factor"),
])
def test_qwen_auxiliary_clip_is_checked(key, value, message):
    from vlmprune.models.qwen2_5_vl.preprocess import check_auxiliary_clip

    check_auxiliary_clip(dict(CLIP))
    with pytest.raises(VlmpruneError, match=message):
        check_auxiliary_clip({**CLIP, key: value})


QWEN = {"resample": "bicubic", "crop_size": [448, 448], "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize("value", [0, -14, "14", 2.5])
def test_qwen_patch_size_is_checked(value):
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor

    QwenPreprocessor(dict(QWEN))
    with pytest.raises(VlmpruneError, match="preprocessing.patch_size must be an integer"):
        QwenPreprocessor({**QWEN, "patch_size": value})


def _qwen_manifest(grid=(16, 16), k=256, rows=1024):
    view = {"image_size": [448, 448], "grid": list(grid), "num_patches": grid[0] * grid[1], "has_cls": False}
    bucket = {"name": "none", "method": "none", "k": k, "image_size": [448, 448], "grid": list(grid),
              "inputs": [{"name": "pixel_values", "kind": "pixel_values", "shape": [rows, 1176]}], "outputs": []}
    return {"vision": {"view": view, "buckets": [bucket]}}


@pytest.mark.parametrize("manifest, constants, message", [
    (_qwen_manifest(), {**QWEN, "merge_size": 1}, "merged 1x1"),  # merge 1 against a graph that merges 2x2
    (_qwen_manifest(grid=(8, 32), k=256), QWEN, "grid \\[8, 32\\] is not the 448x448 image"),
    (_qwen_manifest(k=255), QWEN, "has k 255, but its merged grid"),
    (_qwen_manifest(rows=512), QWEN, "takes 512 patch rows"),
])
def test_qwen_fields_are_cross_checked_against_the_graphs(manifest, constants, message):
    from vlmprune.models.qwen2_5_vl.preprocess import check_qwen_buckets

    check_qwen_buckets(_qwen_manifest(), QWEN)
    with pytest.raises(VlmpruneError, match=message):
        check_qwen_buckets(manifest, constants)


def test_external_data_must_be_a_recorded_file(copy, capsys):
    """A vision graph, re-sealed, that reads its initializers from an unrecorded copy of vision.weights inside the
    bundle: ONNX Runtime opens external data itself, so Bundle.path checks the locations (onnx_wire reads them
    without the onnx package) against the record."""
    import hashlib
    import json

    from vlmprune.onnx_wire import external_locations
    from vlmprune.runtime.cli import run_main

    graph = next(b["file"] for b in manifest_of(copy)["vision"]["buckets"] if b["method"] == "fopru")
    assert set(external_locations(copy / graph)) == {"vision.weights"}
    data = (copy / graph).read_bytes().replace(b"vision.weights", b"visioX.weights")  # same length: still valid
    (copy / graph).write_bytes(data)
    shutil.copy(copy / "vision.weights", copy / "visioX.weights")
    record = json.loads((copy / "record.json").read_text())
    record["files"][graph] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "record.json").write_text(json.dumps(record))
    assert set(external_locations(copy / graph)) == {"visioX.weights"}
    with pytest.raises(VlmpruneError, match="reads external data from visioX.weights, which is not in the integrity"):
        Bundle.open(copy).path(graph)
    with pytest.raises(SystemExit) as exit_code:
        run_main([str(copy), "--image", "sample", "--prompt", "What is here?", "--keep", "0.25",
                  "--max-new-tokens", "2"])
    assert exit_code.value.code == 2 and "visioX.weights" in capsys.readouterr().err


def _next_bucket(kb=144, kr=288):
    outputs = [{"name": "be", "kind": "base_embeds", "shape": [1, kb, 128]},
               {"name": "bi", "kind": "base_indices", "shape": [1, kb]},
               {"name": "re", "kind": "raster_embeds", "shape": [1, kr, 128]},
               {"name": "ri", "kind": "raster_indices", "shape": [1, kr]}]
    return {"name": "gprune-1x2-k432", "num_views": 3, "inputs": [{"kind": "pixel_values", "shape": [3, 3, 336, 336]}],
            "parts": [{"name": "base", "k": 144}, {"name": "raster", "k": 288}], "outputs": outputs}


def test_next_base_and_raster_kinds_are_cross_checked():
    """LLaVA-NeXT's base_*/raster_* kinds swapped (names and shapes kept, so check_io alone passes): the parts'
    recorded K no longer match the outputs' token dimensions."""
    from vlmprune.models.llava_next.geometry import check_anyres_buckets

    check_anyres_buckets({"vision": {"buckets": [_next_bucket()]}})
    swapped = _next_bucket()
    for e in swapped["outputs"]:
        e["kind"] = e["kind"].replace("base", "TMP").replace("raster", "base").replace("TMP", "raster")
    with pytest.raises(VlmpruneError, match="holds 288 tokens, but its base part keeps 144"):
        check_anyres_buckets({"vision": {"buckets": [swapped]}})
    fewer_views = _next_bucket()
    fewer_views["num_views"] = 2
    with pytest.raises(VlmpruneError, match="takes 3 views, but records 2"):
        check_anyres_buckets({"vision": {"buckets": [fewer_views]}})


def test_decoder_cache_kinds_relabelled_between_layers_are_refused(copy):
    """The past_key entries of layers 0 and 1 swap labels (names and shapes kept, so check_io passes), in a manifest
    without the family's name templates (``model.family.decoder_io``, which older bundles lack and a crafted one
    can drop): the graph's wiring (present written from its past by Concat) contradicts the manifest's pairing. It
    used to run, feeding one layer's cache to another."""
    from vlmprune.runtime.pipeline import Pipeline

    m = manifest_of(copy)
    del m["model"]["family"]["decoder_io"]
    for e in m["decoder"]["inputs"]:
        if e["kind"] == "past_key" and e["layer"] in (0, 1):
            e["layer"] = 1 - e["layer"]
    reseal(copy, m)
    with pytest.raises(VlmpruneError, match="decoder.onnx writes 'present.1.key' from 'past_key_values.1.key', but "
                                            "the manifest pairs it with 'past_key_values.0.key'"):
        Pipeline(copy)
