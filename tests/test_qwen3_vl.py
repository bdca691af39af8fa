"""Qwen3-VL: the family in the registry, the tiny preset's geometry, the static-size encoder and its DeepStack
features against transformers' ``Qwen3VLVisionModel`` forward, the torch-free preprocessing against the Qwen2-VL
image processor at patch 16, the M-RoPE positions against ``Qwen3VLModel.get_rope_index``, the DeepStack decoder
against ``Qwen3VLTextModel._deepstack_process``, prune-run's greedy output against ``generate`` (keep 1.0) and a
transformers loop fed the same kept features, DeepStack rows and 3-D positions (each method at keep 0.25), a
checkpoint in the published layout, and the bench preset's vision share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.models.registry import families, family_for
from vlmprune.sample import make_sample_image

PRESET = "tiny-qwen3-vl"
PROMPT = "What color is the car next to the house?"
GRID = (14, 14)  # 448 x 448 / (patch 16 x merge 2)
N = 196


@pytest.fixture(scope="module")
def qwen3():
    from vlmprune.models import load_model

    torch.set_grad_enabled(False)
    adapter = load_model(PRESET)
    yield adapter
    adapter.set_image_size((448, 448))


def test_family_declaration():
    fam = family_for("qwen3_vl")
    assert fam is families()["qwen3_vl"]
    assert fam.transformers_class == "Qwen3VLForConditionalGeneration"
    assert fam.decoder_io.position_rank == 3 and fam.recipe.positions == "mrope" and fam.decoders == ("plain",)
    assert dict(fam.missing_decoders)["fused"].startswith("ONNX Runtime GenAI's builder has no DeepStack input")
    from vlmprune.prune.registry import METHODS

    for name, spec in METHODS.items():  # every method, GridPrune through the auxiliary CLIP
        fam.check_needs(name, spec.needs)
    from vlmprune.models.qwen3_vl.preprocess import parse_image_size

    assert parse_image_size("448x448") == (448, 448) and parse_image_size("480X352") == (480, 352)
    for bad in ("476x448", "0x0", "448x", "big", "4128x32"):
        with pytest.raises(VlmpruneError, match="multiple of 32"):
            parse_image_size(bad)


@pytest.mark.parametrize("model, size, message", [
    ("tiny-qwen3-vl", "476x476", "multiple of 32"),
    ("tiny-qwen2.5-vl", "480x480", "multiple of 28"),
    ("tiny-llava", "448x448", "--image-size is an option of Qwen2.5-VL and Qwen3-VL models"),
])
def test_image_size_flag_is_parsed_by_the_models_family(model, size, message, tmp_path, capsys):
    """--image-size, declared by both Qwen families, is one flag parsed by the model's own family (from its
    config.json, before any weights load): one line and a non-zero exit."""
    from vlmprune.export.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["--model", model, "--method", "gprune", "--keep", "0.25", "--image-size", size, "--out",
              str(tmp_path / "out")])
    assert exit_code.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_fused_decoder_is_refused_in_one_line(tmp_path):
    """ONNX Runtime GenAI's Qwen3VLTextModel (onnxruntime-genai models/builders/qwen.py) has no DeepStack input:
    asking for its decoder is one line naming why (the family's declared reason), before the weights load."""
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps

    with pytest.raises(VlmpruneError, match="no DeepStack input"):
        export_bundle(ExportRequest(model="tiny-qwen3-vl", method="fopru", keeps=[0.25], out=tmp_path / "b",
                                    fused_decoder=True), Steps(quiet=True))
    assert not (tmp_path / "b").exists()


def test_family_runtime_parts_import_without_torch():
    """The family's declaration and runtime hooks import in a process that cannot import torch or transformers."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import vlmprune.models.qwen3_vl.runtime, vlmprune.models.qwen3_vl.preprocess\n"
            "from vlmprune.models.registry import families; assert 'qwen3_vl' in families()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_preset_geometry(qwen3):
    cfg = qwen3.model.config
    v, t = cfg.vision_config, cfg.text_config
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.num_position_embeddings) == (16, 2, 2, 2304)
    assert list(v.deepstack_visual_indexes) == [0, 1, 2] and v.depth == 4 and qwen3.deepstack_levels == 3
    assert t.num_hidden_layers >= 3  # every DeepStack level reaches a decoder layer
    assert t.rope_parameters["mrope_interleaved"] and sum(qwen3.mrope_section) * 2 == qwen3.text.head_dim
    assert cfg.tie_word_embeddings  # as the 2B/4B
    assert qwen3.model.lm_head.weight.data_ptr() == qwen3.model.get_input_embeddings().weight.data_ptr()
    assert qwen3.vision.views[0].grid == GRID and qwen3.vision.patch_size == 16
    prompt = qwen3.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    with pytest.raises(VlmpruneError, match="multiple of 32"):
        qwen3.set_image_size((448, 456))


@pytest.mark.parametrize("size", [(448, 448), (352, 544)])
def test_static_encoder_and_deepstack_match_transformers(qwen3, size):
    """The traced encoder (learned position table resampled to the grid, rotary tables as constants, every block
    full attention) and its DeepStack mergers against Qwen3VLModel.get_image_features on the processor's input."""
    qwen3.set_image_size(size)
    pv = qwen3.processor.image_processor(make_sample_image(size[1], size[0]), return_tensors="pt")["pixel_values"]
    assert pv.shape == (size[0] * size[1] // 256, 3 * 2 * 16 * 16)
    _, merged, deepstack = qwen3.static().run(pv)
    torch.testing.assert_close(merged, qwen3.reference_image_features(pv), rtol=1e-5, atol=1e-5)
    ref = qwen3.reference_deepstack(pv)
    assert deepstack.shape == ref.shape == (3, size[0] * size[1] // 1024, qwen3.text.hidden_size)
    torch.testing.assert_close(deepstack, ref, rtol=1e-5, atol=1e-5)
    qwen3.set_image_size((448, 448))


@pytest.mark.parametrize("wh", [(448, 448), (517, 263), (640, 480), (61, 97)])
def test_runtime_preprocessing_matches_the_processor(qwen3, wh):
    """Reference: Qwen2VLImageProcessorPil at patch 16 (Qwen3-VL's preprocessor_config.json), at its own
    smart_resize of the image, which the bucket is set to."""
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, smart_resize

    ip = qwen3.processor.image_processor
    image = make_sample_image(*wh)
    bucket = smart_resize(wh[1], wh[0], 32, ip.size["shortest_edge"], ip.size["longest_edge"])
    qwen3.set_image_size(bucket)
    theirs = ip(image, return_tensors="np")
    assert list(theirs["image_grid_thw"][0]) == [1, bucket[0] // 16, bucket[1] // 16]
    ours = QwenPreprocessor(qwen3.preprocessing.to_dict())(image)
    assert ours.shape == theirs["pixel_values"].shape and ours.dtype == np.float32
    assert float(np.abs(ours - theirs["pixel_values"]).max()) <= 1e-5
    qwen3.set_image_size((448, 448))


def test_decoder_adds_deepstack_rows_as_transformers_does(qwen3):
    """The exported decoder's one-hot scatter of ``deepstack_embeds`` at ``deepstack_positions`` against
    Qwen3VLTextModel's own forward with visual_pos_masks; and the class's method is intact afterwards."""
    from transformers import DynamicCache

    from vlmprune.models.qwen3_vl.decoder import Qwen3DecoderGraph

    graph = Qwen3DecoderGraph(qwen3).eval()
    g = torch.Generator().manual_seed(3)
    seq, where = 12, torch.tensor([3, 4, 5, 6, 9])
    embeds = torch.randn(1, seq, qwen3.text.hidden_size, generator=g)
    rows = torch.randn(3, len(where), qwen3.text.hidden_size, generator=g)
    positions = torch.arange(seq).view(1, 1, -1).expand(3, 1, -1) + torch.tensor([0, 1, 2]).view(3, 1, 1)
    past = [torch.zeros(1, qwen3.text.num_kv_heads, 0, qwen3.text.head_dim) for _ in range(2 * qwen3.text.num_layers)]
    ours = graph(embeds, torch.ones(1, seq, dtype=torch.int64), positions, *past, rows, where)[0]
    mask = torch.zeros(1, seq, dtype=torch.bool)
    mask[0, where] = True
    lm = qwen3.language_model()
    out = lm(inputs_embeds=embeds, position_ids=positions, past_key_values=DynamicCache(config=lm.config),
             use_cache=True, visual_pos_masks=mask, deepstack_visual_embeds=list(rows))
    theirs = qwen3.lm_head()(out.last_hidden_state)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = graph(embeds, torch.ones(1, seq, dtype=torch.int64), positions, *past)[0]
    assert float((plain - theirs).abs().max()) > 1e-3  # the rows change the logits: the check above is not vacuous
    assert "_deepstack_process" not in vars(lm)


# --- the bundle ------------------------------------------------------------------------------------------------


def _export(model, method, out, validate=True):
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps

    return export_bundle(ExportRequest(model=model, method=method, keeps=[0.25], out=out, validate=validate,
                                       decoder_precision="fp32"), Steps(quiet=True))


@pytest.fixture(scope="module")
def gridprune_bundle(qwen3, tmp_path_factory):
    """prune-export's bundle of the tiny preset with GridPrune at 25 % (the none bucket, the GridPrune graph with the
    auxiliary CLIP's inputs, the CLIP text encoder, the DeepStack decoder), validated and linted as it is written."""
    qwen3.set_image_size((448, 448))
    out = tmp_path_factory.mktemp("qwen3") / "bundle"
    result = _export(PRESET, "gridprune", out)
    v = result.validation
    assert v["passed"] and v["decoder"]["greedy_identical_prefix"] == 32
    assert [c["indices_equal"] for c in v["checks"] if c["output"] == "kept_indices"] == [True] * 4
    assert {c["output"] for c in v["checks"]} >= {"image_embeds", "deepstack_embeds"}
    lint = result.manifest["lint"]
    assert all(lint[f]["trt10"]["ok"] and lint[f]["trt11"]["ok"] for f in lint), lint
    return out


def test_manifest_records_the_deepstack_kinds(gridprune_bundle):
    from vlmprune import graph_io
    from vlmprune.manifest import validate

    m = json.loads((gridprune_bundle / "manifest.json").read_text())
    assert m["family"] == "qwen3_vl" and "decoder_fused" not in m
    assert "DeepStack" in m["decoder_fused_skipped"]
    for b in m["vision"]["buckets"]:
        ds = graph_io.find(b["outputs"], "deepstack_embeds")
        assert ds["shape"] == [3, b["k"], 128]
    ins = m["decoder"]["inputs"]
    assert graph_io.find(ins, "deepstack_embeds")["shape"] == [3, "visual_tokens", 128]
    assert graph_io.find(ins, "deepstack_positions")["shape"] == ["visual_tokens"]
    assert graph_io.find(ins, "position_ids")["shape"][0] == 3
    validate(m, None)  # the schema takes the new kinds
    # a DeepStack kind on a decoder input it does not belong to is refused by the schema
    bad = json.loads((gridprune_bundle / "manifest.json").read_text())
    graph_io.find(bad["decoder"]["inputs"], "deepstack_positions")["kind"] = "raster_count"
    with pytest.raises(VlmpruneError, match="raster_count"):
        validate(bad, None)


def _library_inputs(qwen3, image):
    text = qwen3.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True, tokenize=False)
    return qwen3.processor(text=[text], images=[image], return_tensors="pt")


def _rope_index(qwen3, inputs):
    pos, _ = qwen3.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    return pos  # [3, 1, S]


def test_prompt_positions_follow_get_rope_index(qwen3, gridprune_bundle):
    from vlmprune.models.qwen2_5_vl.positions import prompt_positions
    from vlmprune.runtime.pipeline import open_bundle

    pipe = open_bundle(gridprune_bundle)
    inputs = _library_inputs(qwen3, make_sample_image(448, 448))
    ref = _rope_index(qwen3, inputs)[:, 0].numpy()
    ids = pipe.prompt.encode(PROMPT)
    image_id = qwen3.text.image_token_id
    assert [t for t in inputs["input_ids"][0].tolist() if t != image_id] == [t for t in ids if t != image_id]
    for mode in ("original", "contiguous"):  # identical when every token is kept
        pos, nxt = prompt_positions(ids, image_id, GRID, np.arange(N), mode)
        np.testing.assert_array_equal(pos, ref)
        assert nxt == ref.max() + 1


def _runtime_logits(pipe, image, tokens):
    """The runtime's logits at every step of a token path, from its own pieces (the none bucket, the family's
    stitch with its DeepStack prefill inputs, the decoder with its cache)."""
    bucket = next(b for b in pipe.manifest["vision"]["buckets"] if b["method"] == "none")
    req = pipe.request(image, PROMPT, bucket=bucket)
    st = req.stitched
    pipe.decoder.reset()
    rows = [np.array(pipe.decoder.step(st.embeds, st.positions, st.decoder_inputs), np.float32)]
    for i, token in enumerate(tokens[:-1]):
        step = np.full((3, 1, 1), st.next_pos + i, np.int64)
        rows.append(np.array(pipe.decoder.step(np.asarray(pipe.table[token])[None, None], step), np.float32))
    return np.stack(rows)


def test_keep_all_equals_generate(qwen3, gridprune_bundle):
    """keep 1.0: prune-run's pipeline gives transformers' generate's 32 greedy tokens (fed the processor's own
    inputs, mm_token_type_ids included), every step's logits within 1e-4 of the largest."""
    from transformers import GenerationConfig

    from vlmprune.runtime.pipeline import open_bundle

    image = make_sample_image(448, 448)
    pipe = open_bundle(gridprune_bundle)
    ours = pipe.generate(image, PROMPT, keep=1.0, max_new_tokens=32, ignore_eos=True)
    inputs = _library_inputs(qwen3, image)
    assert "mm_token_type_ids" in inputs
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=qwen3.tokenizer.pad_token_id)
    out = qwen3.model.generate(**inputs, generation_config=config, output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.bucket == f"none-448x448-k{N}" and ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert ours.tokens_generated == 32 and ours.token_ids == theirs
    ref = torch.cat(out.logits).numpy()
    assert float(np.abs(_runtime_logits(pipe, image, theirs) - ref).max()) <= 1e-4 * float(np.abs(ref).max())


def _library_greedy(qwen3, embeds, positions, next_pos, visual_mask, deepstack, steps=32):
    """A transformers greedy loop: Qwen3VLTextModel (its own _deepstack_process at ``visual_mask``) and the LM head,
    fed the given inputs_embeds, DeepStack rows and 3-D positions, then one token at a time."""
    from transformers import DynamicCache

    lm, head = qwen3.language_model(), qwen3.lm_head()
    table = qwen3.model.get_input_embeddings().weight
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
             visual_pos_masks=visual_mask, deepstack_visual_embeds=list(deepstack))
    tokens = []
    for i in range(steps):
        token = int(head(out.last_hidden_state)[0, -1].argmax())
        tokens.append(token)
        pos = torch.full((3, 1, 1), next_pos + i, dtype=torch.long)
        out = lm(inputs_embeds=table[[token]][None], position_ids=pos, past_key_values=cache, use_cache=True)
    return tokens


def _check_pruned(qwen3, bundle, method):
    """The runtime's kept indices, features and DeepStack rows are the PyTorch graph's; its greedy tokens are those
    of the transformers loop fed them with positions derived from get_rope_index (the method's default mode)."""
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, clip_view
    from vlmprune.models.qwen3_vl.graphs import Qwen3VisionGraph
    from vlmprune.runtime.pipeline import open_bundle

    qwen3.set_image_size((448, 448))
    image = make_sample_image(448, 448)
    pipe = open_bundle(bundle)
    mode = pipe.positions
    ours = pipe.generate(image, PROMPT, keep=0.25, max_new_tokens=32, ignore_eos=True)
    k = N // 4
    pv = torch.from_numpy(QwenPreprocessor(qwen3.preprocessing.to_dict())(image))
    args = (pv,)
    if method == "gridprune":
        args += (torch.from_numpy(clip_view(image, qwen3.clip_constants())),
                 qwen3.text_embeds(qwen3.clip.tokenizer(PROMPT, return_tensors="pt")["input_ids"]))
    feats, deepstack, kept = Qwen3VisionGraph(qwen3, method, k)(*args)
    assert ours.bucket == f"{method}-448x448-k{k}" and ours.kept_indices == kept[0].tolist()

    inputs = _library_inputs(qwen3, image)
    full = _rope_index(qwen3, inputs)
    ids = inputs["input_ids"][0]
    where = int((ids == qwen3.text.image_token_id).nonzero()[0])
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[where:where + N] = False
    keep[where + kept[0]] = True
    positions = full[:, :, keep].clone()
    if mode == "contiguous":  # the text after the image follows the kept tokens' largest position
        after = positions[:, :, where + k:]
        positions[:, :, where + k:] = after - after.min() + positions[:, :, where:where + k].max() + 1
    table = qwen3.model.get_input_embeddings().weight
    embeds = torch.cat([table[ids[:where]], feats[0], table[ids[where + N:]]])[None]
    visual = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
    visual[0, where:where + k] = True
    theirs = _library_greedy(qwen3, embeds, positions, int(positions.max()) + 1, visual, deepstack)
    assert ours.token_ids == theirs


def test_gridprune_equals_a_library_loop_fed_the_same_features(qwen3, gridprune_bundle):
    _check_pruned(qwen3, gridprune_bundle, "gridprune")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fopru", "gprune", "l2norm", "pool"])
def test_each_method_equals_a_library_loop_fed_the_same_features(qwen3, tmp_path, method):
    _export(PRESET, method, tmp_path / "bundle", validate=False)
    _check_pruned(qwen3, tmp_path / "bundle", method)


def test_prune_run_cli_on_the_bundle(gridprune_bundle, capsys):
    from vlmprune.runtime.cli import run_main

    with pytest.raises(SystemExit) as exit_code:
        run_main([str(gridprune_bundle), "--image", "sample", "--prompt", PROMPT, "--keep", "0.25",
                  "--max-new-tokens", "4"])
    assert exit_code.value.code == 0
    assert f"{N // 4}/{N} visual tokens" in capsys.readouterr().out


def test_prune_viz_and_profile_through_the_family_hooks(gridprune_bundle, tmp_path):
    """prune-viz draws the kept merged tokens of prune-run's own selection over the whole image; prune-profile
    times every bucket's graph (DeepStack output included) on ONNX Runtime."""
    from PIL import Image

    from vlmprune.runtime.cli import viz_main
    from vlmprune.runtime.profile_cli import main as profile_main

    out = tmp_path / "kept.png"
    with pytest.raises(SystemExit) as exit_code:
        viz_main([str(gridprune_bundle), "--image", "sample", "--prompt", PROMPT, "-o", str(out)])
    assert exit_code.value.code == 0
    with Image.open(out) as picture:
        assert picture.size[0] > 300 and picture.size[1] > 300
    with pytest.raises(SystemExit) as exit_code:
        profile_main([str(gridprune_bundle), "--backend", "ort", "--iterations", "2", "--warmup", "1", "--out",
                      str(tmp_path / "profile")])
    assert exit_code.value.code == 0
    rows = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert [r["k"] for r in rows] == [N, N // 4] and all(r["median"] > 0 for r in rows)


@pytest.mark.slow
def test_prune_eval_runs_the_bundle(gridprune_bundle, tmp_path):
    """prune-eval opens the bundle through the family hooks: every bucket answers."""
    from vlmprune.runtime.eval_cli import main

    images = tmp_path / "images"
    images.mkdir()
    make_sample_image(500, 400).save(images / "a.png")
    (images / "prompt.txt").write_text(PROMPT + "\n")
    with pytest.raises(SystemExit) as exit_code:
        main([str(gridprune_bundle), "--data", str(images), "--out", str(tmp_path / "eval"), "--max-new-tokens", "3",
              "--plain-progress"])
    assert exit_code.value.code == 0
    text = json.dumps(json.loads((tmp_path / "eval" / "summary.json").read_text()))
    assert "gridprune" in text and "none" in text


def test_decoder_refuses_unknown_prefill_inputs(gridprune_bundle):
    from vlmprune.runtime.pipeline import open_bundle

    pipe = open_bundle(gridprune_bundle)
    with pytest.raises(VlmpruneError, match="takes no raster_count input"):
        pipe.decoder.step(np.zeros((1, 2, 128), np.float32), np.zeros((3, 1, 2), np.int64),
                          {"raster_count": np.zeros(1, np.int64)})


def test_bench_preset_vision_share():
    """bench-qwen3-vl's vision share of the unpruned prefill's compute is Qwen3-VL-4B's at 448 x 448 (within 0.05).
    Reference: Qwen/Qwen3-VL-4B-Instruct config.json (vision depth 24, width 1024, MLP 4096, out 2560, DeepStack at
    5/11/17; text 36 layers, 2560 wide, 32 heads of 128, 8 KV heads, MLP 9728)."""
    from vlmprune.models.qwen3_vl import PRESETS
    from vlmprune.models.qwen3_vl.preset import deepstack_blocks, ttft_macs

    four_b = ttft_macs(
        {"patch_size": 16, "spatial_merge_size": 2, "hidden_size": 1024, "intermediate_size": 4096, "depth": 24,
         "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]},
        {"hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "intermediate_size": 9728, "num_hidden_layers": 36}, (448, 448))
    spec = next(p for p in PRESETS if p.name == "bench-qwen3-vl")
    bench = ttft_macs(
        {"patch_size": spec.patch_size, "spatial_merge_size": spec.spatial_merge, "hidden_size": spec.vision_hidden,
         "intermediate_size": spec.vision_intermediate, "depth": spec.vision_layers,
         "out_hidden_size": spec.text_hidden, "deepstack_visual_indexes": deepstack_blocks(spec.vision_layers)},
        {"hidden_size": spec.text_hidden, "num_attention_heads": spec.text_heads, "num_key_value_heads":
         spec.text_kv_heads, "head_dim": spec.text_hidden // spec.text_heads, "intermediate_size":
         spec.text_intermediate, "num_hidden_layers": spec.text_layers}, (spec.image_size, spec.image_size))
    share = [v / (v + t) for v, t in (four_b, bench)]
    assert 0.2 < share[0] < 0.35, share
    assert abs(share[1] - share[0]) <= 0.05, share


def _published_checkpoint(preset: Path, dst: Path) -> Path:
    """The preset laid out as Qwen/Qwen3-VL-4B-Instruct is published: a transformers-4.57 config.json (``rope_scaling``
    with ``mrope_interleaved``, ``torch_dtype``, the vision config's ``model_type`` ``qwen3_vl``), bf16 weights in two
    shards with ``model.safetensors.index.json``, tied embeddings (no ``lm_head.weight``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
              "generation_config.json"):
        shutil.copy(preset / f, dst / f)
    c = json.loads((preset / "config.json").read_text())
    t, v = dict(c["text_config"]), dict(c["vision_config"])
    t["rope_scaling"] = {k: t["rope_parameters"][k] for k in ("mrope_interleaved", "mrope_section", "rope_type")}
    t["rope_theta"] = t.pop("rope_parameters")["rope_theta"]
    v["model_type"] = "qwen3_vl"
    published = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                 "text_config": t, "vision_config": v, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                 "transformers_version": "4.57.0",
                 **{k: c[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id",
                                      "video_token_id")}}
    (dst / "config.json").write_text(json.dumps(published))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(preset / "model.safetensors").items()
               if k != "lm_head.weight"}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, dst / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, part in shards.items() for k in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.slow
def test_published_checkpoint_layout_loads_strictly_and_runs(tmp_path):
    """A checkpoint in the published layout loads strictly (nothing missing, unexpected or mis-shaped), a shard
    missing is one line, and its bundle runs with generate's greedy tokens."""
    from transformers import GenerationConfig

    from vlmprune.models import ensure_preset, load_model
    from vlmprune.models.loading import checkpoint_dtype
    from vlmprune.runtime.pipeline import open_bundle

    folder = _published_checkpoint(ensure_preset(PRESET), tmp_path / "Qwen3-VL-tiny")
    assert checkpoint_dtype(folder) == "BF16"
    adapter = load_model(str(folder))
    assert adapter.model.config.tie_word_embeddings and adapter.mrope_section == (6, 5, 5)
    assert adapter.mrope_interleaved and adapter.deepstack_levels == 3
    assert adapter.model.lm_head.weight.data_ptr() == adapter.model.get_input_embeddings().weight.data_ptr()
    _export(str(folder), "l2norm", tmp_path / "export", validate=False)
    image = make_sample_image(448, 448)
    ours = open_bundle(tmp_path / "export").generate(image, PROMPT, keep=1.0, max_new_tokens=12, ignore_eos=True)
    inputs = _library_inputs(adapter, image)
    out = adapter.model.generate(**inputs, generation_config=GenerationConfig(
        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=adapter.tokenizer.pad_token_id))
    assert ours.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(VlmpruneError):
        load_model(str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_decoder_exports_and_validates_at_every_precision(tmp_path, precision):
    """The DeepStack decoder at each --decoder-precision: streamed, validated over 32 greedy tokens against fp32
    PyTorch with that precision's floors (export/validate.py), its DeepStack inputs kept (the int8/int4 quantizer
    rewrites MatMuls only), and the bundle answers through prune-run's pipeline."""
    from vlmprune import graph_io
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps
    from vlmprune.runtime.pipeline import open_bundle

    out = tmp_path / "bundle"
    result = export_bundle(ExportRequest(model=PRESET, method="pool", keeps=[0.25], out=out,
                                         decoder_precision=precision), Steps(quiet=True))
    v = result.validation
    assert v["passed"] and v["decoder"]["precision"] == precision and v["decoder"]["greedy_tokens"] == 32
    inputs = result.manifest["decoder"]["inputs"]
    assert all(graph_io.has(inputs, kind) for kind in graph_io.PREFILL_INPUTS)
    answer = open_bundle(out).generate(make_sample_image(), PROMPT, keep=0.25, max_new_tokens=4, ignore_eos=True)
    assert answer.tokens_generated == 4 and answer.visual_tokens_kept == N // 4
