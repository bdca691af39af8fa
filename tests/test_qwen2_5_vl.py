"""Qwen2.5-VL: the family in the registry, the tiny preset's geometry, the static-size encoder against
transformers' own forward, the torch-free preprocessing against the Qwen2-VL image processor, every method against
the spec on the library's forward and in ONNX Runtime, the M-RoPE positions against get_rope_index, the torch-free
runtime's greedy output against generate (keep 1.0) and a transformers loop (pruned), the bench rows, and a
checkpoint in the published layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmprune.errors import VlmpruneError
from vlmprune.models.registry import families, family_for
from vlmprune.sample import make_sample_image

PRESET = "tiny-qwen2.5-vl"


@pytest.fixture(scope="module")
def qwen():
    from vlmprune.models import load_model

    torch.set_grad_enabled(False)
    adapter = load_model(PRESET)
    yield adapter
    adapter.set_image_size((448, 448))


def test_family_declaration():
    fam = family_for("qwen2_5_vl")
    assert fam is families()["qwen2_5_vl"]
    assert fam.transformers_class == "Qwen2_5_VLForConditionalGeneration"
    caps = fam.capabilities
    assert not caps.has_cls and not caps.clip_joint_space and caps.global_attention_layer == "last_full_attention"
    assert fam.decoder_io.position_rank == 3 and fam.recipe.positions == "mrope"
    assert fam.recipe.preprocess == "qwen2_vl"
    assert any("norm" in s for s in fam.fp32_scopes) and any("method" in s for s in fam.fp32_scopes)
    from vlmprune.prune.registry import METHODS

    for name, spec in METHODS.items():  # GridPrune through the auxiliary CLIP
        fam.check_needs(name, spec.needs)
    assert caps.auxiliary_clip


def test_preset_geometry(qwen):
    cfg = qwen.model.config
    v = cfg.vision_config
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 112)
    assert list(v.fullatt_block_indexes) == [1, 3] and v.depth == 4
    assert sum(qwen.mrope_section) * 2 == qwen.text.head_dim
    assert qwen.vision.views[0].grid == (16, 16) and not qwen.vision.views[0].has_cls
    tok = qwen.tokenizer
    for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert qwen.text.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert qwen.text.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = qwen.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(VlmpruneError, match="multiple of 28"):
        qwen.set_image_size((448, 450))
    from vlmprune.models.qwen2_5_vl.adapter import parse_image_size

    assert parse_image_size("448x448") == (448, 448) and parse_image_size("476X364") == (476, 364)
    assert parse_image_size("560") == (560, 560)
    for bad in ("450x448", "0x0", "448x", "big", "4060x28"):
        with pytest.raises(VlmpruneError, match="multiple of 28"):
            parse_image_size(bad)


@pytest.mark.parametrize("size", [(448, 448), (476, 364), (280, 560)])
def test_static_encoder_matches_transformers(qwen, size):
    """448 x 448 has equal windows (a reshape), the others ragged ones (the block mask); the pieces the exporter
    traces (up to the scoring block, the rest, window order undone, merger) compose to the library's forward."""
    qwen.set_image_size(size)
    image = make_sample_image(size[1], size[0])
    pv = qwen.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    assert pv.shape[0] == size[0] * size[1] // 196
    ref = qwen.reference_image_features(pv)
    ours = qwen.project(qwen.select_patches(qwen.scoring_layer(qwen.hidden_before_scoring(pv))))
    assert ours.shape == (size[0] * size[1] // 784, qwen.text.hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# (image width, height): the bucket is the processor's own smart_resize of the image, so both resize alike
@pytest.mark.parametrize("wh", [(448, 448), (517, 263), (640, 480), (300, 900), (61, 97), (1500, 1100)])
def test_runtime_preprocessing_matches_the_processor(qwen, wh):
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, smart_resize

    ip = qwen.processor.image_processor
    image = make_sample_image(*wh)
    bucket = smart_resize(wh[1], wh[0], 28, ip.size["shortest_edge"], ip.size["longest_edge"])
    qwen.set_image_size(bucket)
    theirs = ip(image, return_tensors="np")
    assert list(theirs["image_grid_thw"][0]) == [1, bucket[0] // 14, bucket[1] // 14]
    ours = QwenPreprocessor(qwen.preprocessing.to_dict())(image)
    assert ours.shape == theirs["pixel_values"].shape and ours.dtype == np.float32
    assert float(np.abs(ours - theirs["pixel_values"]).max()) <= 1e-5


def test_runtime_preprocessing_modes(qwen):
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor

    qwen.set_image_size((448, 448))
    pre = QwenPreprocessor(qwen.preprocessing.to_dict())
    rgb = make_sample_image(448, 448)
    for image in (rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        theirs = qwen.processor.image_processor(image, return_tensors="np")["pixel_values"]
        assert float(np.abs(pre(image) - theirs).max()) <= 1e-5
    # any image goes to the bucket size
    assert pre(make_sample_image(1000, 300)).shape == (1024, 3 * 2 * 14 * 14)
    with pytest.raises(VlmpruneError, match="not a multiple of 28"):
        QwenPreprocessor({**qwen.preprocessing.to_dict(), "crop_size": [448, 450]})


# --- the vision graphs -----------------------------------------------------------------------------------------


def _library_fopru_scores(qwen, pv):
    """FoPru's merged-token scores from transformers' own forward: the hidden state and rotary tables entering the
    last full-attention block (window order) captured by a hook, q/k from the library's attention pieces, and the
    window permutation undone with the library's window index."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    from vlmprune.prune.fopru import scores_from_attention

    visual = qwen.model.model.visual
    last = max(visual.config.fullatt_block_indexes)
    seen = {}
    hook = visual.blocks[last].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
    try:
        feats = qwen.reference_image_features(pv)
    finally:
        hook.remove()
    blk = visual.blocks[last]
    x = seen["x"]
    n = x.shape[0]
    q, k, _ = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, blk.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    probs = torch.softmax((q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2)) * blk.attn.scaling, -1)
    sig = scores_from_attention(probs.mean(0, keepdim=True), has_cls=False)[0]  # window order
    window_index, _ = get_vision_window_index(torch.tensor([qwen.grid_thw]), 2, visual.config.window_size, 14)
    order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
    per_patch = torch.empty_like(sig)
    per_patch[order] = sig
    return per_patch.reshape(-1, 4).mean(-1), feats


def _library_received_attention(qwen, pv):
    """GridPrune's saliency from the library's forward: the attention each merged token receives in the last
    full-attention block (mean over queries and heads, 2x2 group mean, divided by the maximum)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual = qwen.model.model.visual
    blk = visual.blocks[max(visual.config.fullatt_block_indexes)]
    seen = {}
    hook = blk.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
    try:
        qwen.reference_image_features(pv)
    finally:
        hook.remove()
    n = seen["x"].shape[0]
    q, k, _ = blk.attn.qkv(blk.norm1(seen["x"])).reshape(n, 3, blk.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    probs = torch.softmax((q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2)) * blk.attn.scaling, -1)
    received = probs.mean(1).mean(0)  # window order
    window_index, _ = get_vision_window_index(torch.tensor([qwen.grid_thw]), 2, visual.config.window_size, 14)
    per_patch = torch.empty_like(received)
    per_patch[(window_index[:, None] * 4 + torch.arange(4)).reshape(-1)] = received
    merged = per_patch.reshape(-1, 4).mean(-1)
    return merged / merged.max()


def test_gridprune_follows_the_spec(qwen):
    """Relevance from the auxiliary CLIP's own forward (penultimate layer, post_layernorm, visual projection)
    resampled onto the merged grid, saliency from the library's attention; zones and budgets as on LLaVA."""
    import torch.nn.functional as F

    from vlmprune.models.qwen2_5_vl.graphs import QwenVisionGraph
    from vlmprune.prune.gridprune import gridprune_from_scores
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, clip_view

    qwen.set_image_size((448, 448))
    image = make_sample_image(640, 480)
    pv = torch.from_numpy(QwenPreprocessor(qwen.preprocessing.to_dict())(image))
    cp = torch.from_numpy(clip_view(image, qwen.clip_constants()))
    side = qwen.clip.model.config.vision_config.image_size  # the auxiliary CLIP's own input size
    assert cp.shape == (1, 3, side, side)
    clip = qwen.clip.model
    t = clip.get_text_features(input_ids=qwen.clip.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    t = (t if isinstance(t, torch.Tensor) else t.pooler_output)
    t = t / t.norm(dim=-1, keepdim=True)
    h = clip.vision_model(pixel_values=cp, output_hidden_states=True).hidden_states[-2][:, 1:]
    v = clip.visual_projection(clip.vision_model.post_layernorm(h))
    r = torch.nn.functional.cosine_similarity(v, t[:, None], dim=-1).reshape(1, 1, 24, 24)
    r = F.interpolate(r, size=(16, 16), mode="bilinear", align_corners=False).flatten(1)
    a = _library_received_attention(qwen, pv)[None]
    s = 0.5 * (r + 1) * 0.5 + 0.5 * a
    expected = gridprune_from_scores(r, s, 64, (16, 16), 4, 1.0)
    embeds, idx = QwenVisionGraph(qwen, "gridprune", 64)(pv, cp, qwen.text_embeds(
        qwen.clip.tokenizer(PROMPT, return_tensors="pt")["input_ids"]))
    assert idx.tolist() == expected.tolist()
    assert len(set((idx[0] // 16 // 4 * 4 + idx[0] % 16 // 4).tolist())) > 1  # spread over several zones


@pytest.mark.parametrize("size", [(448, 448), (476, 364)])
def test_methods_follow_the_spec_on_the_library_forward(qwen, size):
    import torch.nn.functional as F

    from vlmprune.models.qwen2_5_vl.graphs import QwenVisionGraph
    from vlmprune.prune.gprune import gprune_select
    from vlmprune.prune.select import topk_ascending
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor

    qwen.set_image_size(size)
    pv = torch.from_numpy(QwenPreprocessor(qwen.preprocessing.to_dict())(make_sample_image(640, 480)))
    scores, feats = _library_fopru_scores(qwen, pv)
    h, w = qwen.vision.views[0].grid
    n = h * w
    k = n // 4
    embeds, idx = QwenVisionGraph(qwen, "fopru", k)(pv)
    assert idx.tolist() == topk_ascending(scores[None], k).tolist()
    torch.testing.assert_close(embeds[0], feats[idx[0]], rtol=1e-5, atol=1e-5)
    _, idx = QwenVisionGraph(qwen, "gprune", k)(pv)
    assert idx.tolist() == gprune_select(feats[None], k).tolist()
    embeds, idx = QwenVisionGraph(qwen, "none", n)(pv)
    assert idx[0].tolist() == list(range(n))
    torch.testing.assert_close(embeds[0], feats, rtol=1e-5, atol=1e-5)
    if h % 2 == 0 and w % 2 == 0:
        embeds, _ = QwenVisionGraph(qwen, "pool", k)(pv)
        pooled = F.avg_pool2d(feats.reshape(h, w, -1).permute(2, 0, 1)[None], 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embeds, pooled, rtol=1e-5, atol=1e-5)
    embeds, idx = QwenVisionGraph(qwen, "fopru", 2 * w, {"strategy": "row"})(pv)
    rows = scores.reshape(h, w).sum(-1)
    assert sorted(set((idx[0] // w).tolist())) == sorted(torch.topk(rows, 2).indices.tolist())


def test_vision_graphs_export_lint_clean_and_match_pytorch(qwen, tmp_path):
    """FoPru at a ragged size (the block-mask windows) and at 448x448 (equal windows), G-Prune and pool at 448x448
    (GridPrune's graph is exported by the ``qwen_bundle`` fixture): fp32 ONNX Runtime indices identical to the
    PyTorch module's, embeddings within tolerance, clean for trt10 and trt11; and one fp16 graph (overlap >= 0.9)."""
    import types

    from vlmprune.export.progress import Steps
    from vlmprune.models.qwen2_5_vl.export import QwenExport, plan_qwen
    from vlmprune.models.registry import family_by_key
    from vlmprune.export.targets import get_target
    from vlmprune.prune import get_method

    prompt_embeds = qwen.text_embeds(qwen.clip.tokenizer(PROMPT, return_tensors="pt")["input_ids"])

    def export(method, size, precision="fp32"):
        spec = get_method(method)
        buckets = [b for b in plan_qwen(spec, spec.defaults(), qwen, keeps=(0.25,), image_sizes=[size])
                   if b.method != "none"]
        out = tmp_path / f"{method}-{precision}-{size[0]}x{size[1]}"
        (out / ".scratch").mkdir(parents=True)
        checks = []
        req = types.SimpleNamespace(precision=precision, validate=True)
        text = method == "gridprune"
        hooks = QwenExport(family_by_key("qwen2_5_vl"))
        records, lint = hooks.export_vision(req, qwen, buckets, get_target("trt10"), text,
                                            prompt_embeds if text else None, out, out / ".scratch", Steps(), checks)
        for file, per_target in lint.items():
            assert per_target["trt10"]["ok"] and per_target["trt11"]["ok"], file
        assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]
        return records, checks

    records, checks = export("fopru", (476, 364))
    assert [r["name"] for r in records] == ["fopru-476x364-k55"] and records[0]["grid"] == [17, 13]
    assert all(c.indices_equal for c in checks if c.output == "kept_indices")
    for method in ("fopru", "gprune", "pool"):
        _, checks = export(method, (448, 448))
        assert all(c.indices_equal for c in checks if c.output == "kept_indices")
    _, checks = export("fopru", (448, 448), precision="fp16")
    assert min(c.index_overlap for c in checks if c.output == "kept_indices") >= 0.9


# --- decoder, positions and generation ---------------------------------------------------------------------------

PROMPT = "What color is the car next to the house?"


@pytest.fixture(scope="module")
def qwen_bundle(qwen, tmp_path_factory):
    """prune-export's bundle of the tiny preset with GridPrune at 25 % (the none bucket, the GridPrune graph with the
    auxiliary CLIP's inputs, the CLIP text encoder, the M-RoPE decoder), validated and linted as it is written."""
    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps

    qwen.set_image_size((448, 448))
    out = tmp_path_factory.mktemp("qwen") / "bundle"
    result = export_bundle(ExportRequest(model=PRESET, method="gridprune", keeps=[0.25], out=out,
                                         family_options={"image_sizes": [(448, 448)]}), Steps(quiet=True))
    v = result.validation
    assert v["passed"] and v["decoder"]["greedy_identical_prefix"] == 32
    assert [c["indices_equal"] for c in v["checks"] if c["output"] == "kept_indices"] == [True] * 4
    lint = result.manifest["lint"]
    assert {"decoder.onnx", "text_encoder.onnx", "vision_gridprune_448x448_k64.onnx"} <= set(lint)
    assert all(lint[f]["trt10"]["ok"] and lint[f]["trt11"]["ok"] for f in lint), lint
    return out


def _library_inputs(qwen, image):
    """transformers' own processor inputs for the chat prompt with one image (its size is the bucket's, so the
    processor keeps it)."""
    text = qwen.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True, tokenize=False)
    return qwen.processor(text=[text], images=[image], return_tensors="pt")


def _rope_index(qwen, inputs):
    pos, _ = qwen.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"])
    return pos  # [3, 1, S]


def test_prompt_positions_follow_get_rope_index(qwen, qwen_bundle):
    from vlmprune.runtime.pipeline import open_bundle as open_pipeline
    from vlmprune.models.qwen2_5_vl.positions import prompt_positions

    pipe = open_pipeline(qwen_bundle)
    inputs = _library_inputs(qwen, make_sample_image(448, 448))
    ref = _rope_index(qwen, inputs)[:, 0].numpy()
    ids = pipe.prompt.encode(PROMPT)
    image_id = qwen.text.image_token_id
    full = inputs["input_ids"][0].tolist()
    assert [t for t in full if t != image_id] == [t for t in ids if t != image_id]  # same prompt around the image
    for mode in ("original", "contiguous"):  # identical when every token is kept
        pos, nxt = prompt_positions(ids, image_id, (16, 16), np.arange(256), mode)
        np.testing.assert_array_equal(pos, ref)
        assert nxt == ref.max() + 1
    kept = np.array([3, 40, 41, 200, 255])
    where = ids.index(image_id)
    mask = np.ones(ref.shape[1], bool)
    mask[where:where + 256] = False
    mask[where + kept] = True
    pos, nxt = prompt_positions(ids, image_id, (16, 16), kept, "original")
    np.testing.assert_array_equal(pos, ref[:, mask])  # the unpruned positions of what is kept
    assert nxt == ref.max() + 1
    pos, nxt = prompt_positions(ids, image_id, (16, 16), kept, "contiguous")
    np.testing.assert_array_equal(pos[:, :where + 5], ref[:, mask][:, :where + 5])
    last = ref[:, where + 255].max()  # the kept token 255 is the image's last: (t, h, w) = where + (0, 15, 15)
    np.testing.assert_array_equal(pos[:, where + 5:], np.arange(last + 1, last + 1 + len(ids) - where - 1)[None]
                                  .repeat(3, 0))


def _runtime_logits(pipe, image, tokens):
    """The bundle runtime's logits at every step of a token path, from its own pieces (preprocessing, the none
    bucket's graph, the M-RoPE stitch, the decoder with its cache)."""
    from vlmprune.models.qwen2_5_vl.positions import stitch_qwen

    bucket = next(b for b in pipe.manifest["vision"]["buckets"] if b["method"] == "none")
    out = pipe.vision_backend(bucket).run({"pixel_values": pipe.preprocess(image)})
    ids = pipe.prompt.encode(PROMPT)
    embeds, pos, nxt = stitch_qwen(ids, pipe.prompt.image_token_id, pipe.table, out["image_embeds"],
                                   out["kept_indices"][0], pipe.family.grid, pipe.positions)
    pipe.decoder.reset()
    rows = [np.array(pipe.decoder.step(embeds, pos), np.float32)]
    for i, token in enumerate(tokens[:-1]):
        step = np.full((3, 1, 1), nxt + i, np.int64)
        rows.append(np.array(pipe.decoder.step(np.asarray(pipe.table[token])[None, None], step), np.float32))
    return np.stack(rows)


def test_keep_all_equals_generate(qwen, qwen_bundle):
    """keep 1.0: prune-run's pipeline gives transformers' generate's 32 greedy tokens, and the logits of every
    step within 1e-4 of its largest (the tiny random decoder's greedy path alone could hide a wrong image)."""
    from transformers import GenerationConfig

    from vlmprune.runtime.pipeline import open_bundle as open_pipeline

    image = make_sample_image(448, 448)
    pipe = open_pipeline(qwen_bundle)
    ours = pipe.generate(image, PROMPT, keep=1.0, max_new_tokens=32, ignore_eos=True)
    inputs = _library_inputs(qwen, image)
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=qwen.tokenizer.pad_token_id)
    out = qwen.model.generate(**inputs, generation_config=config, output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.bucket == "none-448x448-k256" and ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert ours.tokens_generated == 32 and ours.token_ids == theirs
    ref = torch.cat(out.logits).numpy()
    assert float(np.abs(_runtime_logits(pipe, image, theirs) - ref).max()) <= 1e-4 * float(np.abs(ref).max())


def _library_greedy(qwen, embeds, positions, next_pos, steps=32):
    """A transformers greedy loop over the full model with given inputs_embeds and 3-D positions."""
    from transformers import DynamicCache

    model = qwen.model
    table = model.get_input_embeddings().weight
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True)
    tokens = []
    for i in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        pos = torch.full((3, 1, 1), next_pos + i, dtype=torch.long)
        out = model(inputs_embeds=table[[token]][None], position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens


@pytest.mark.parametrize("mode", ["original", "contiguous"])
def test_pruned_equals_a_library_loop_fed_the_same_tokens_and_positions(qwen, qwen_bundle, mode):
    """GridPrune keep 0.25 (the auxiliary CLIP's view and text encoder run by the runtime): the kept indices are the
    PyTorch module's, the runtime's M-RoPE positions are those derived from get_rope_index, and its greedy tokens
    are those of a transformers loop fed the same kept features at those positions."""
    from vlmprune.models.qwen2_5_vl.graphs import QwenVisionGraph
    from vlmprune.runtime.pipeline import Pipeline as QwenBundlePipeline
    from vlmprune.models.qwen2_5_vl.positions import prompt_positions
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, clip_view

    qwen.set_image_size((448, 448))
    image = make_sample_image(448, 448)
    pipe = QwenBundlePipeline(qwen_bundle, positions=mode)
    ours = pipe.generate(image, PROMPT, keep=0.25, max_new_tokens=32, ignore_eos=True)
    pv = torch.from_numpy(QwenPreprocessor(qwen.preprocessing.to_dict())(image))
    cp = torch.from_numpy(clip_view(image, qwen.clip_constants()))
    t = qwen.text_embeds(qwen.clip.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    feats, kept = QwenVisionGraph(qwen, "gridprune", 64)(pv, cp, t)
    assert ours.bucket == "gridprune-448x448-k64" and ours.kept_indices == kept[0].tolist()

    inputs = _library_inputs(qwen, image)
    full = _rope_index(qwen, inputs)
    ids = inputs["input_ids"][0]
    where = int((ids == qwen.text.image_token_id).nonzero()[0])
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[where:where + 256] = False
    keep[where + kept[0]] = True
    positions = full[:, :, keep].clone()
    if mode == "contiguous":  # the text after the image follows the kept tokens' largest position
        after = positions[:, :, where + 64:]
        positions[:, :, where + 64:] = after - after.min() + positions[:, :, where:where + 64].max() + 1
    runtime_pos, _ = prompt_positions(pipe.prompt.encode(PROMPT), pipe.prompt.image_token_id, pipe.family.grid,
                                      np.array(ours.kept_indices), mode)
    np.testing.assert_array_equal(runtime_pos, positions[:, 0].numpy())
    table = qwen.model.get_input_embeddings().weight
    embeds = torch.cat([table[ids[:where]], feats[0], table[ids[where + 1 + 255:]]])[None]
    theirs = _library_greedy(qwen, embeds, positions, int(positions.max()) + 1)
    assert ours.token_ids == theirs


def test_pipeline_refuses_bad_requests_in_one_line(qwen_bundle):
    from vlmprune.runtime.pipeline import Pipeline as QwenBundlePipeline

    with pytest.raises(VlmpruneError, match="unknown positions mode 'gapped'"):
        QwenBundlePipeline(qwen_bundle, positions="gapped")
    pipe = QwenBundlePipeline(qwen_bundle)
    with pytest.raises(VlmpruneError, match="2 image placeholders"):
        pipe.generate(make_sample_image(300, 200), "<|image_pad|> and <|image_pad|>?", keep=0.25)


def test_bench_rows_measure_ttft_against_keep(tmp_path, capsys):
    """prune-bench on a Qwen2.5-VL preset (export/bench_qwen.py through bench.run_bench): one row per bucket with
    measured stage times from prune-run's pipeline, and the single-view bench's targets evaluated on them."""
    import types

    from vlmprune.export.bench import run_bench

    args = types.SimpleNamespace(model=PRESET, methods="gprune", keep="1.0,0.25", repeats=1, warmup=0,
                                 image="sample", out=tmp_path, threads=None, prompt=PROMPT, new_tokens=3,
                                 decoder_precisions="fp32")
    report = run_bench(args)
    assert [(r["method"], r["k"], r["keep"]) for r in report["rows"]] == [("gprune", 256, 1.0), ("gprune", 64, 0.25)]
    for row in report["rows"]:
        assert row["ttft_ms"] > row["prefill_ms"] > 0 and row["vision_prune_ms"] > 0 and row["tokens_generated"] == 3
        assert row["prompt_tokens"] == report["rows"][0]["prompt_tokens"] - 256 + row["k"]
        assert row["bare_decoder_step_ms"] > 0 and row["positions"] == "original"
    assert "runtime TPOT / bare decoder step (worst)" in {t["target"] for t in report["targets"]}
    assert (tmp_path / "bundles" / "gprune-fp32" / "manifest.json").is_file()


def _legacy_checkpoint(preset: Path, dst: Path) -> Path:
    """The preset rewritten the way the published Qwen2.5-VL checkpoints are laid out (Qwen/Qwen2.5-VL-3B-Instruct):
    a flat pre-5.x config.json (text fields at the top, ``rope_scaling`` of type ``mrope``), the 4.x tensor names
    (``visual.*``, ``model.layers.*``), tied input/output embeddings, bf16 weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
              "generation_config.json"):
        shutil.copy(preset / f, dst / f)
    c = json.loads((preset / "config.json").read_text())
    t, v = c["text_config"], c["vision_config"]
    flat = {k: t[k] for k in ("hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                              "num_hidden_layers", "num_key_value_heads", "vocab_size", "eos_token_id")}
    legacy = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **flat,
        "bos_token_id": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 70, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
        "rope_scaling": {"type": "mrope", "mrope_section": t["rope_parameters"]["mrope_section"]},
        **{k: c[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")},
        "vision_config": {**{k: v[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                               "out_hidden_size", "patch_size", "spatial_merge_size", "window_size",
                                               "fullatt_block_indexes", "temporal_patch_size")},
                          "hidden_act": "silu", "in_chans": 3, "spatial_patch_size": 14, "tokens_per_second": 2},
    }
    (dst / "config.json").write_text(json.dumps(legacy))
    renamed = {}
    for key, value in load_file(preset / "model.safetensors").items():
        if key == "lm_head.weight":
            continue  # tied to the input embeddings
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        renamed[key] = value.to(torch.bfloat16)
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_published_checkpoint_layout_loads_and_matches_generate(tmp_path):
    """A checkpoint in the published layout loads strictly (legacy config, 4.x names, tied embeddings, bf16), and
    its prune-export bundle runs in prune-run's pipeline with generate's greedy tokens."""
    from transformers import GenerationConfig

    from vlmprune.export.exporter import ExportRequest, export_bundle
    from vlmprune.export.progress import Steps
    from vlmprune.models import ensure_preset, load_model
    from vlmprune.models.loading import checkpoint_dtype
    from vlmprune.runtime.pipeline import open_bundle as open_pipeline

    folder = _legacy_checkpoint(ensure_preset(PRESET), tmp_path / "Qwen2.5-VL-tiny")
    assert checkpoint_dtype(folder) == "BF16"
    adapter = load_model(str(folder))  # strict: nothing missing, unexpected or mis-shaped
    assert adapter.model.config.tie_word_embeddings and adapter.mrope_section == (4, 6, 6)
    assert adapter.model.lm_head.weight.data_ptr() == adapter.model.get_input_embeddings().weight.data_ptr()
    export_bundle(ExportRequest(model=str(folder), method="l2norm", keeps=[0.5], out=tmp_path / "export",
                                decoder_precision="fp32"), Steps(quiet=True))
    image = make_sample_image(448, 448)
    ours = open_pipeline(tmp_path / "export").generate(image, PROMPT, keep=1.0, max_new_tokens=12, ignore_eos=True)
    inputs = _library_inputs(adapter, image)
    out = adapter.model.generate(**inputs, generation_config=GenerationConfig(
        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=adapter.tokenizer.pad_token_id))
    assert ours.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_prune_run_cli_on_the_bundle(qwen, qwen_bundle, capsys):
    """prune-run on the bundle: the manifest's family and M-RoPE decoder, the method's positions, one answer line
    and the timing line."""
    import json

    from vlmprune.runtime.pipeline import open_bundle as open_pipeline
    from vlmprune.runtime.cli import run_main
    from vlmprune.runtime.pipeline import Pipeline as QwenBundlePipeline

    m = json.loads((qwen_bundle / "manifest.json").read_text())
    assert m["model"]["family"]["model_type"] == "qwen2_5_vl" and m["preprocessing"]["kind"] == "qwen2_vl"
    assert m["auxiliary_clip"]["size"] == qwen.clip.model.config.vision_config.image_size
    assert m["prompt"]["positions"] == "original"
    assert next(i["shape"] for i in m["decoder"]["inputs"] if i["name"] == "position_ids")[0] == 3
    assert [b["name"] for b in m["vision"]["buckets"]] == ["none-448x448-k256", "gridprune-448x448-k64"]
    pipe = open_pipeline(qwen_bundle)
    assert isinstance(pipe, QwenBundlePipeline) and pipe.positions == "original"
    with pytest.raises(SystemExit) as exit_code:
        run_main([str(qwen_bundle), "--image", "sample", "--prompt", PROMPT, "--keep", "0.25", "--max-new-tokens",
                  "4", "--positions", "contiguous"])
    assert exit_code.value.code == 0
    assert "64/256 visual tokens" in capsys.readouterr().out


def test_prune_viz_draws_the_merged_grid(qwen_bundle, tmp_path):
    """prune-viz on the bundle: one panel per pruned bucket over the whole image (the model's view), the kept
    merged tokens of prune-run's own selection boxed on the 16 x 16 grid."""
    from PIL import Image

    from vlmprune.runtime.pipeline import open_bundle as open_pipeline
    from vlmprune.runtime.cli import viz_main

    out = tmp_path / "kept.png"
    with pytest.raises(SystemExit) as exit_code:
        viz_main([str(qwen_bundle), "--image", "sample", "--prompt", PROMPT, "-o", str(out)])
    assert exit_code.value.code == 0
    with Image.open(out) as picture:
        assert picture.size[0] > 300 and picture.size[1] > 300
    pipe = open_pipeline(qwen_bundle)
    bucket = next(b for b in pipe.manifest["vision"]["buckets"] if b["method"] == "gridprune")
    image = make_sample_image()
    kept = pipe.request(image, PROMPT, bucket=bucket).stitched.kept  # the generic callers' path
    assert kept.tolist() == pipe.generate(image, PROMPT, bucket=bucket, max_new_tokens=1).kept_indices
    assert pipe.family.model_view(image).size == image.size  # the whole image, no crop


def test_prune_eval_runs_the_bundle(qwen_bundle, tmp_path):
    """prune-eval opens Qwen bundles with their own pipeline: every bucket answers, the unpruned one agrees with
    itself."""
    import json

    from vlmprune.runtime.eval_cli import main

    images = tmp_path / "images"
    images.mkdir()
    make_sample_image(500, 400).save(images / "a.png")
    (images / "prompt.txt").write_text(PROMPT + "\n")
    with pytest.raises(SystemExit) as exit_code:
        main([str(qwen_bundle), "--data", str(images), "--out", str(tmp_path / "eval"), "--max-new-tokens", "3",
              "--plain-progress"])
    assert exit_code.value.code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "gridprune" in text and "none" in text


def test_prune_run_prune_eval_and_pruned_vlm_agree_on_qwen(qwen_bundle, tmp_path):
    """The one way in (issue 20): prune-run's pipeline, PrunedVLM (which failed inside ONNX Runtime on Qwen bundles)
    and prune-eval (zero items skipped) give the same tokens, GridPrune's auxiliary-CLIP inputs included."""
    from test_llava_next_runtime import _same_answers_everywhere

    result = _same_answers_everywhere(qwen_bundle, tmp_path, image_size=(640, 480))
    assert result.view == "image size 448x448"


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_generation_to_the_context_end_keeps_its_answer(qwen_bundle, positions, capsys):
    """Issue 27: under M-RoPE the 64 kept image tokens take 16 position ids, so positions run behind the cache; the
    budget counts cache slots and the generation stops with ``context`` at exactly the context's last slot, keeping
    the answer (it used to fail with 'the sequence would reach 2049 tokens' and lose it). prune-run prints it."""
    from vlmprune.runtime.cli import run_main
    from vlmprune.runtime.pipeline import Pipeline as QwenBundlePipeline

    pipe = QwenBundlePipeline(qwen_bundle, positions=positions)
    context = pipe.decoder_spec["max_context"]
    result = pipe.generate(make_sample_image(), PROMPT, keep=0.25, max_new_tokens=10**9, ignore_eos=True)
    assert result.stop_reason == "context"
    assert result.prompt_tokens + result.tokens_generated == context
    assert pipe.decoder.length == context - 1  # the last token is answered, never fed: the cache is full
    assert result.text and result.text == pipe.prompt.decode(result.token_ids)
    with pytest.raises(SystemExit) as exit_code:
        run_main([str(qwen_bundle), "--image", "sample", "--prompt", PROMPT, "--keep", "0.25", "--max-new-tokens",
                  "1000000000", "--positions", positions])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    assert "(context)" in out or "(eos)" in out  # prune-run stops at EOS unless the context comes first


@pytest.mark.parametrize("craft, message", [
    (lambda m: m["preprocessing"].update(merge_size=1), "merged 1x1"),
    (lambda m: m["vision"]["view"].update(grid=[8, 32]), "grid \\[8, 32\\]"),
    (lambda m: m["preprocessing"].update(patch_size=0), "patch_size must be an integer"),
    (lambda m: m["auxiliary_clip"].update(mean=[float("nan"), 0.4, 0.4]), "auxiliary_clip.mean must be 3 finite"),
    (lambda m: m["auxiliary_clip"].update(size=0), "auxiliary_clip.size must be an integer"),
    (lambda m: m["auxiliary_clip"].update(resample="sinc"), "auxiliary_clip.resample 'sinc'"),
])
def test_crafted_family_fields_are_one_line_when_the_bundle_opens(qwen_bundle, tmp_path, craft, message):
    """Issue 26: the family's own manifest fields, re-sealed so that only the checks stand in the way (they gave
    tracebacks, NaN inputs or a wrong stitch)."""
    import shutil

    from crafting import manifest_of, reseal
    from vlmprune.runtime.pipeline import Pipeline as QwenBundlePipeline

    copy = tmp_path / "b"
    shutil.copytree(qwen_bundle, copy, symlinks=True)
    m = manifest_of(copy)
    craft(m)
    reseal(copy, m)
    with pytest.raises(VlmpruneError, match=message):
        QwenBundlePipeline(copy)


def test_prune_eval_to_the_context_end_keeps_every_answer(qwen_bundle, tmp_path):
    """Issue 27: prune-eval --max-new-tokens 2100 on a Qwen bundle skipped every item (the cache filled before the
    position budget ended) and exited 0. Now each answer stops with `context` and is recorded."""
    import json

    from vlmprune.runtime.eval_cli import main

    images = tmp_path / "images"
    images.mkdir()
    make_sample_image(500, 400).save(images / "a.png")
    (images / "prompt.txt").write_text(PROMPT + "\n")
    with pytest.raises(SystemExit) as exit_code:
        main([str(qwen_bundle), "--data", str(images), "--out", str(tmp_path / "eval"), "--max-new-tokens", "2100",
              "--keep", "0.25", "--plain-progress"])
    assert exit_code.value.code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["dataset"]["skipped"] == 0 and summary["answers"]["computed"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()[1:]]
    assert [r["stop_reason"] for r in rows] == ["context", "context"]
    assert all(r["prompt_tokens"] + r["tokens_generated"] == 2048 and r["text"] for r in rows)
