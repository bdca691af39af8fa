"""The fused decoder for ONNX Runtime (ONNX Runtime GenAI's model builder graph): export, validation against
PyTorch, the manifest record, the runtime's in-place KV buffer, and greedy equality with the plain decoder."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime_genai", reason="the fused decoder is built by onnxruntime-genai's model builder")

from vlmprune.bundle import Bundle  # noqa: E402
from vlmprune.errors import VlmpruneError  # noqa: E402
from vlmprune.export.exporter import ExportRequest, export_bundle  # noqa: E402
from vlmprune.export.progress import Steps  # noqa: E402
from vlmprune.runtime.pipeline import Pipeline  # noqa: E402
from vlmprune.sample import make_sample_image  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "b"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out, fused_decoder=True), Steps(quiet=True))


def test_fused_decoder_is_exported_validated_and_recorded(bundle):
    manifest = bundle.manifest
    fused = manifest["decoder_fused"]
    assert manifest["decoder"]["file"] == "decoder.onnx"  # the standard-op decoder stays for TensorRT
    assert (fused["file"], fused["weights"]) == ("decoder_fused.onnx", "decoder_fused.weights")
    recorded = Bundle.open(bundle.path).paths  # also checks the record against the manifest schema
    for name in (fused["file"], fused["weights"]):
        assert "/" not in name and (bundle.path / name).is_file() and name in recorded
    assert fused["providers"] == ["CPUExecutionProvider"] and fused["precision"] == "fp32"
    assert fused["buffer_length"] == manifest["decoder"]["max_context"]
    assert fused["kv_cache"]["shared_past_present"] and fused["sequence_inputs"] == ["attention_mask"]
    assert {i["name"] for i in fused["inputs"]} >= {"inputs_embeds", "attention_mask", "past_key_values.0.key"}
    assert next(o for o in fused["outputs"] if o["name"] == "logits")["shape"][1] == 1  # last position only
    graph = onnx.load(str(bundle.path / fused["file"]), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert not ops & {"Softmax", "Concat", "Transpose", "Range", "Where"}  # attention, cache and mask all fused
    gqa = next(n for n in graph.graph.node if n.op_type == "GroupQueryAttention")
    assert onnx.helper.get_attribute_value(next(a for a in gqa.attribute if a.name == "do_rotary")) == 1
    validation = json.loads((bundle.path / "validation.json").read_text())
    checks = [c for c in validation["checks"] if c["graph"] == "decoder_fused.onnx"]
    assert {c["case"] for c in checks} >= {"prefill", "steps with cache", "greedy 32 tokens"}
    assert checks and all(c["passed"] for c in checks)
    summary = validation["decoder_fused"]
    assert summary["greedy_identical_prefix"] == 32 and summary["logits_min_cosine"] > 0.99999
    assert summary["logits_max_abs_diff"]["cached_steps_max"] < 1e-3


def test_runtime_picks_the_fused_decoder_and_greedy_matches_the_plain_one(bundle):
    image = make_sample_image()
    fused = Pipeline(bundle.path)
    plain = Pipeline(bundle.path, decoder="plain")
    assert (fused.decoder_kind, plain.decoder_kind) == ("fused", "plain")
    a = fused.generate(image, "What is next to the house?", max_new_tokens=24, ignore_eos=True)
    b = plain.generate(image, "What is next to the house?", max_new_tokens=24, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24  # fp32: the same greedy path
    # gapped positions cannot be expressed by rotary-in-attention: the plain decoder takes over, or a clear error
    assert Pipeline(bundle.path, positions="original").decoder_kind == "plain"
    with pytest.raises(VlmpruneError, match="--positions original needs the plain one"):
        Pipeline(bundle.path, positions="original", decoder="fused")


def test_kv_buffer_is_written_in_place_and_steps_allocate_nothing(bundle):
    pipe = Pipeline(bundle.path)
    dec = pipe.decoder
    spec = pipe.manifest["decoder_fused"]
    rng = np.random.default_rng(0)
    dec.reset()
    before = [v.data_ptr() for v in dec.cache]
    dec.step(rng.standard_normal((1, 7, spec["hidden_size"]), dtype=np.float32), np.arange(7)[None])
    x = np.zeros((1, 1, spec["hidden_size"]), np.float32)
    position = np.zeros((1, 1), np.int64)
    tracemalloc.start()
    for i in range(150):  # warm under tracing: Python's own free lists fill up in the first ~100 calls, then hold
        position[0, 0] = 7 + i
        dec.step(x, position)
    tracemalloc.reset_peak()
    settled, _ = tracemalloc.get_traced_memory()
    for i in range(20):
        position[0, 0] = 157 + i
        logits = dec.step(x, position)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current - settled < 256  # nothing kept per step (a few bytes of interpreter bookkeeping at most)
    assert peak - settled < spec["hidden_size"] * 4  # nor made and dropped: not even one embedding row of memory
    assert [v.data_ptr() for v in dec.cache] == before and dec.length == 177
    outputs = dec.binding.get_outputs()  # the presents ONNX Runtime wrote are the very buffers bound as past
    assert [o.data_ptr() for o in outputs[:len(before)]] == before
    key0 = dec.cache_arrays[0]
    assert np.abs(key0[0, :, :177]).sum() > 0 and not np.any(key0[0, :, 177:200])  # written in place, no further
    assert logits.shape == (spec["vocab_size"],) and logits is not None
    assert np.shares_memory(logits, dec.step(x, np.array([[177]])))  # one logits buffer, reused
    with pytest.raises(VlmpruneError, match="position ids"):
        dec.step(x, np.array([[200]]))


def test_streamed_int4_is_the_builders_own_int4(tiny, tmp_path):
    """int8/int4 are quantised one MatMul at a time (memory); the result must be what the builder writes itself."""
    from vlmprune.export.decoder_fused import BUILDER_OPTIONS, build_fused_decoder, run_builder

    record = build_fused_decoder(tiny, tmp_path, "int4")
    assert record["quantization"]["bits"] == 4 and record["ops"].get("MatMul", 0) == 0
    reference = run_builder(tiny, tmp_path / "builder", "int4", "cpu", {**BUILDER_OPTIONS, "filename": "ref.onnx"})
    ours = onnx.load(str(tmp_path / record["file"]))
    theirs = onnx.load(str(reference / "ref.onnx"))
    weights = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = weights(ours), weights(theirs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    nodes = lambda m: sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node)  # noqa: E731
    assert nodes(ours) == nodes(theirs)


def test_no_fused_decoder_flag(tmp_path):
    result = export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=tmp_path / "b", validate=False,
                                         fused_decoder=False), Steps(quiet=True))
    assert "decoder_fused" not in result.manifest and not (result.path / "decoder_fused.onnx").exists()
    pipe = Pipeline(result.path)
    assert pipe.decoder_kind == "plain" and "no fused decoder" in pipe.decoder_note


def test_manifest_schema_holds_the_fused_record(bundle):
    """The record is typed: a KV buffer beyond the model's context or a path outside the bundle is refused."""
    from vlmprune.manifest import validate

    for key, value, message in (("buffer_length", 10**7, "beyond the model's context"),
                                ("file", "../decoder.onnx", "not a plain relative path"),
                                ("positions", "original", "must be one of contiguous")):
        manifest = json.loads((bundle.path / "manifest.json").read_text())
        manifest["decoder_fused"][key] = value
        with pytest.raises(VlmpruneError, match=f"decoder_fused.{key} .*{message}"):
            validate(manifest, None)


def test_a_kv_buffer_shorter_than_the_context_ends_with_context_and_keeps_the_answer(bundle):
    """Issue 27: the decode budget counts the fused decoder's buffer (its capacity), not only the model's context;
    before, the step past the buffer failed and the answer was lost."""
    from vlmprune.runtime.fused_decoder import FusedDecoder

    image, prompt = make_sample_image(), "What is next to the house?"
    pipe = Pipeline(bundle.path)
    assert pipe.decoder_kind == "fused"
    prompt_tokens = pipe.generate(image, prompt, max_new_tokens=1).prompt_tokens
    assert prompt_tokens + 7 < pipe.decoder_spec["max_context"]
    pipe.decoder = FusedDecoder(pipe.decoder.backend, pipe.manifest["decoder_fused"], capacity=prompt_tokens + 7)
    result = pipe.generate(image, prompt, max_new_tokens=10**9, ignore_eos=True)
    assert result.stop_reason == "context" and result.tokens_generated == 7
    assert result.text == pipe.prompt.decode(result.token_ids)


def test_the_fused_graphs_wiring_pairs_each_present_with_its_past(bundle):
    """The check behind a relabelled cache (issue 26) reads GroupQueryAttention's wiring too: the recorded pairing
    passes, layers 0 and 1 swapped are named. (A crafted fused record cannot get that far: its names must be the
    builder's standard ones; this is the second line of defence.)"""
    from vlmprune.graph_io import DecoderNames, cache_pairing_problem
    from vlmprune.onnx_wire import main_graph_nodes

    record = json.loads((bundle.path / "manifest.json").read_text())["decoder_fused"]
    nodes = main_graph_nodes(bundle.path / record["file"])
    assert cache_pairing_problem(nodes, DecoderNames.of(record, "decoder_fused")) is None
    for e in record["inputs"]:
        if e["kind"] == "past_key" and e["layer"] in (0, 1):
            e["layer"] = 1 - e["layer"]
    problem = cache_pairing_problem(nodes, DecoderNames.of(record, "decoder_fused"))
    assert problem.startswith("writes 'present.0.key' from 'past_key_values.0.key', but the manifest pairs it with "
                              "'past_key_values.1.key'")
