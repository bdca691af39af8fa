"""The manifest is the one contract for tensor names: every graph input and output carries its kind, the runtime
binds the recorded names, a family with its own decoder names runs unchanged, crafted kinds get one line, and
bundles of schema version 2 (names only) still read."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from crafting import edit, manifest_of, reseal
from vlmprune import graph_io
from vlmprune.bundle import SCHEMA_VERSION, Bundle
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.models import registry
from vlmprune.runtime.cli import run_main
from vlmprune.runtime.pipeline import Pipeline
from vlmprune.sample import make_sample_image

PROMPT = "What is next to the red house?"
# A decoder naming nothing the way optimum does: the runtime can only find these through the manifest.
RENAMED = registry.DecoderIO(inputs_embeds="embeds", attention_mask="mask", position_ids="positions",
                             past_key="cache_in.{layer}.k", past_value="cache_in.{layer}.v", logits="next_logits",
                             present_key="cache_out.{layer}.k", present_value="cache_out.{layer}.v")


def _export(out: Path) -> Path:
    return export_bundle(ExportRequest(method="gridprune", keeps=[0.25], out=out, validate=True, fused_decoder=False),
                         Steps(quiet=True)).path


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("io") / "standard")


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    """tiny-llava exported as if its family declared other decoder names (the registry entry swapped for the run)."""
    fams = registry.families()
    original = fams["llava"]
    fams["llava"] = dataclasses.replace(original, decoder_io=RENAMED)
    try:
        return _export(tmp_path_factory.mktemp("io") / "renamed")
    finally:
        fams["llava"] = original


def test_every_graph_tensor_has_its_kind(standard):
    m = manifest_of(standard)
    assert m["schema_version"] == SCHEMA_VERSION
    graphs = [*m["vision"]["buckets"], m["text_encoder"], m["decoder"]]
    for g in graphs:
        for entry in g["inputs"] + g["outputs"]:
            assert entry["kind"] in graph_io.KINDS, entry
    dec = m["decoder"]
    layers = dec["num_layers"]
    assert sorted((e["kind"], e.get("layer")) for e in dec["inputs"] if "layer" in e) == sorted(
        (f"past_{kv}", i) for i in range(layers) for kv in ("key", "value"))
    pruned = next(b for b in m["vision"]["buckets"] if b["method"] == "gridprune")
    assert [e["kind"] for e in pruned["inputs"]] == ["pixel_values", "text_embeds"]


def test_a_family_with_its_own_decoder_names_runs_unchanged(standard, renamed):
    m = manifest_of(renamed)
    names = {e["name"] for e in m["decoder"]["inputs"] + m["decoder"]["outputs"]}
    assert {"embeds", "mask", "positions", "next_logits", "cache_in.0.k", "cache_out.1.v"} <= names
    assert not any(n.startswith(("past_key_values", "present")) or n in ("logits", "inputs_embeds") for n in names)
    assert json.loads((renamed / "validation.json").read_text())["passed"]  # export validation found the names too
    image = make_sample_image()
    ours = Pipeline(renamed).generate(image, PROMPT, max_new_tokens=12, ignore_eos=True)
    theirs = Pipeline(standard).generate(image, PROMPT, max_new_tokens=12, ignore_eos=True)
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) == 12


def test_kinds_in_a_version_2_manifest_are_replaced_by_those_of_its_names(standard, tmp_path):
    """Version 2 wrote no kinds: any found in such a file were crafted, and reading ignores them."""
    copy = tmp_path / "v2"
    shutil.copytree(standard, copy)
    m = manifest_of(copy)
    m["schema_version"] = 2
    _swap_kinds(m["vision"]["buckets"][1]["outputs"], ("image_embeds", None), ("kept_indices", None))
    _swap_kinds(m["decoder"]["inputs"], ("past_key", 0), ("past_key", 1))
    reseal(copy, m)
    read = Bundle.open(copy).manifest
    assert [e["kind"] for e in read["vision"]["buckets"][1]["outputs"]] == ["image_embeds", "kept_indices"]
    assert graph_io.DecoderNames.of(read["decoder"]).past[:3] == (
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key")


def test_version_2_bundles_read_with_the_kinds_of_their_names(standard, tmp_path):
    copy = tmp_path / "v2"
    shutil.copytree(standard, copy)
    m = manifest_of(copy)
    for g in [*m["vision"]["buckets"], m["text_encoder"], m["decoder"]]:
        for entry in g["inputs"] + g["outputs"]:
            entry.pop("kind"), entry.pop("layer", None)
    m["schema_version"] = 2
    reseal(copy, m)
    b = Bundle.open(copy)
    assert b.version == 2 and b.manifest["decoder"]["inputs"][3]["kind"] == "past_key"
    assert "kind" not in manifest_of(copy)["decoder"]["inputs"][0]  # read as version 3; the file is untouched
    image = make_sample_image()
    old = Pipeline(copy).generate(image, PROMPT, max_new_tokens=6, ignore_eos=True)
    new = Pipeline(standard).generate(image, PROMPT, max_new_tokens=6, ignore_eos=True)
    assert old.token_ids == new.token_ids


def _layer_entry(m, kind, layer):
    return next(i for i, e in enumerate(m["decoder"]["inputs"] if kind.startswith("past") else m["decoder"]["outputs"])
                if e.get("kind") == kind and e.get("layer") == layer)


CRAFTED = {
    "kind missing": (edit(["decoder", "inputs", 0, "kind"], KeyError), r"decoder.inputs\[0\].kind is missing"),
    "unknown kind": (edit(["decoder", "inputs", 0, "kind"], "rope_cache"), "kind must be one of"),
    "vision kind on the decoder": (edit(["decoder", "inputs", 0, "kind"], "pixel_values"),
                                   "is not a kind this graph has"),
    "kind twice": (edit(["decoder", "inputs", 1, "kind"], "inputs_embeds"), "repeats inputs_embeds"),
    "layer out of range": (lambda m: edit(["decoder", "inputs", _layer_entry(m, "past_key", 1), "layer"], 7)(m),
                           "is 7, but the decoder has 2 layers"),
    "layer missing": (lambda m: edit(["decoder", "inputs", _layer_entry(m, "past_value", 0), "layer"], KeyError)(m),
                      "needs a layer"),
    "a layer's cache gone": (lambda m: m["decoder"]["outputs"].pop(_layer_entry(m, "present_value", 1)),
                             "decoder.outputs has no present_value for layer 1"),
    "layer on logits": (edit(["decoder", "outputs", 0, "layer"], 0), "must not have a layer"),
    "no pixels": (edit(["vision", "buckets", 0, "inputs", 0, "kind"], "valid_mask"), "has no pixel_values"),
    "no kept indices": (edit(["vision", "buckets", 0, "outputs", 1, "kind"], "image_embeds"), "repeats image_embeds"),
    "bad position rank": (edit(["decoder", "inputs", 2, "shape"], ["batch"]),
                          r"is position_ids, an integer tensor of rank 2 or 3, but is listed as int64 \['batch'\]"),
    # consistent lies: every field well-formed, the kinds attached to the wrong tensors
    "layers permuted": (lambda m: _swap_kinds(m["decoder"]["inputs"], ("past_key", 0), ("past_key", 1)),
                        r"decoder.inputs\[\d+\].name is 'past_key_values.0.key', but the past_key of layer 1 is named "
                        "'past_key_values.1.key'"),
    "key and value swapped": (lambda m: _swap_kinds(m["decoder"]["inputs"], ("past_key", 0), ("past_value", 0)),
                              "but the past_(key|value) of layer 0 is named"),
    "outputs swapped": (lambda m: _swap_kinds(m["vision"]["buckets"][1]["outputs"], ("image_embeds", None),
                                              ("kept_indices", None)),
                        "is kept_indices, an integer tensor of rank 2, but is listed as float32"),
    "indices listed as float": (edit(["vision", "buckets", 1, "outputs", 1, "dtype"], "float32"),
                                "is kept_indices, an integer tensor"),
    "K unlike the bucket's": (lambda m: m["vision"]["buckets"][1]["outputs"][0]["shape"].__setitem__(1, 7),
                              r"outputs\[0\].shape has 7 on axis 1, the manifest's image_embeds has"),
    # names and shapes swapped along with the kinds: only the graph itself can tell (check_io, at open)
    "outputs and their forms swapped": (lambda m: _swap_names(m["vision"]["buckets"][1]["outputs"], 0, 1),
                                        r"the graph of bucket \S+ shapes 'kept_indices' \[1, \d+\], not \[1, \d+, \d+\]"),
    "position rank lie": (edit(["decoder", "inputs", 2, "shape"], [3, "batch", "sequence"]),
                          r"decoder.onnx shapes 'position_ids' \['batch', 'sequence'\], not \[3, 'batch', 'sequence'\]"),
}


def _swap_kinds(entries, a, b):
    i = next(j for j, e in enumerate(entries) if (e["kind"], e.get("layer")) == a)
    k = next(j for j, e in enumerate(entries) if (e["kind"], e.get("layer")) == b)
    for key in ("kind", "layer"):
        entries[i][key], entries[k][key] = entries[k].get(key), entries[i].get(key)
        for e in (entries[i], entries[k]):
            if e[key] is None:
                del e[key]


def _swap_names(entries, i, k):
    entries[i]["name"], entries[k]["name"] = entries[k]["name"], entries[i]["name"]


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_kinds_get_one_line(standard, tmp_path, capsys, case):
    copy = tmp_path / "b"
    shutil.copytree(standard, copy)
    craft, message = CRAFTED[case]
    m = manifest_of(copy)
    craft(m)
    reseal(copy, m)
    code = run_main.run([str(copy), "--image", "sample", "--prompt", "hi", "--max-new-tokens", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(lines) and re.search(message, lines[-1]), lines[-3:]


def test_runtime_feeds_by_kind_and_refuses_inputs_it_cannot_fill():
    entries = [{"name": "images", "kind": "pixel_values"}, {"name": "query", "kind": "text_embeds"}]
    x, t = np.zeros(2), np.ones(3)
    assert graph_io.feeds(entries, {"pixel_values": x, "text_embeds": t}, "bucket b") == {"images": x, "query": t}
    with pytest.raises(VlmpruneError, match=r"the bucket b graph takes 'query' \(kind text_embeds\)"):
        graph_io.feeds(entries, {"pixel_values": x}, "bucket b")
    outs = [{"name": "feats", "kind": "image_embeds"}, {"name": "idx", "kind": "kept_indices"}]
    assert graph_io.by_kind(outs, {"feats": 1, "idx": 2}) == {"image_embeds": 1, "kept_indices": 2}


def test_standard_names_and_their_kinds():
    assert graph_io.standard_kind("past_key_values.12.value") == ("past_value", 12)
    assert graph_io.standard_kind("present.0.key") == ("present_key", 0)
    assert graph_io.standard_kind("logits") == ("logits", None)
    assert graph_io.standard_kind("past_key") is None  # a kind, but not a name any exporter wrote
    assert graph_io.standard_kind("present.x.key") is None and graph_io.standard_kind("weights") is None
    with pytest.raises(ValueError, match="has no kind"):
        graph_io.with_kinds([{"name": "mystery"}], {})


def test_without_a_chat_template_the_prompt_must_place_the_image(standard):
    """No template is invented: the placeholder goes where the user writes it, and a prompt without one is refused."""
    from vlmprune.runtime.prompt import PromptBuilder

    spec = {**manifest_of(standard)["prompt"], "chat_template": None}
    builder = PromptBuilder(standard / "tokenizer.json", spec)
    token = spec["image_token"]
    assert builder.render(f"{token}\nWhat is this?") == f"{token}\nWhat is this?"
    assert builder.encode(f"Look: {token} what is this?").count(spec["image_token_id"]) == 1
    with pytest.raises(VlmpruneError, match="no chat template, so the prompt must hold the image placeholder"):
        builder.render("What is this?")


@pytest.mark.parametrize("tool", ["prune-run", "prune-profile", "prune-calibrate"])
def test_a_manifest_naming_tensors_the_graph_lacks_is_one_line(standard, tmp_path, capsys, tool):
    """Names that match no tensor of the graph (a crafted manifest, a graph from another export): every tool that
    opens the graphs says so in one line before running anything."""
    from vlmprune.calibrate.cli import main as calibrate_main
    from vlmprune.runtime.profile_cli import main as profile_main

    copy = tmp_path / "b"
    shutil.copytree(standard, copy)
    m = manifest_of(copy)
    for bucket in m["vision"]["buckets"]:
        bucket["inputs"][0]["name"] = "images"
    reseal(copy, m)
    if tool == "prune-run":
        code = run_main.run([str(copy), "--image", "sample", "--prompt", "hi", "--max-new-tokens", "2"])
    elif tool == "prune-profile":
        code = profile_main.run([str(copy), "--backend", "ort", "--iterations", "1", "--warmup", "0"])
    else:
        images = tmp_path / "images"
        images.mkdir()
        make_sample_image().save(images / "a.png")
        code = calibrate_main.run([str(copy), "--images", str(images)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(lines), lines[-3:]
    assert re.search(r"the graph of bucket \S+ has no input 'images'; re-export", lines[-1]), lines[-1]
    assert not (copy / "profile").exists() and not (copy / "int8").exists()
