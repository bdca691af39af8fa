"""The LLaVA-1.5 adapter over the tiny preset: the pieces agree with the library's own forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.models import PRESETS, load_model, resolve_path
from vlmprune.prune import METHODS, cls_attention, head_mean_attention


def test_tiny_preset_has_llava15_geometry(tiny):
    spec, vcfg = PRESETS["tiny-llava"], tiny.model.config.vision_config
    assert (vcfg.image_size, vcfg.patch_size) == (spec.image_size, spec.patch_size)  # the checkpoint has the spec's
    side = vcfg.image_size // vcfg.patch_size
    view = tiny.vision.views[0]
    assert view.grid == (side, side) and view.num_patches == side * side and view.has_cls
    assert view.image_size == (vcfg.image_size, vcfg.image_size) and tiny.vision.patch_size == vcfg.patch_size
    assert tiny.vision.feature_layer == -2 and tiny.vision.layers_run == tiny.vision.num_layers - 1
    assert tiny.preprocessing.crop_size == view.image_size and tiny.preprocessing.resample == "bicubic"
    assert tiny.text.image_token == "<image>"
    assert tiny.tokenizer.convert_tokens_to_ids("<image>") == tiny.text.image_token_id
    assert tiny.model.__class__.__name__ == "LlavaForConditionalGeneration"
    assert (tiny.path / "model.safetensors").exists() and (tiny.path / "tokenizer.json").exists()


def pixels(tiny, seed=0):
    return torch.randn(1, 3, *tiny.vision.views[0].image_size, generator=torch.Generator().manual_seed(seed))


def test_pieces_match_the_library_forward(tiny):
    x = pixels(tiny)
    hidden = tiny.hidden_before_scoring(x)
    features = tiny.scoring_layer(hidden)
    ours = tiny.project(tiny.select_patches(features))
    theirs = tiny.reference_image_features(x)
    assert ours.shape == (1, tiny.vision.views[0].num_patches, tiny.text.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    hf = tiny.model.model.get_image_features(pixel_values=x, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
    hf = hf.pooler_output[0] if hasattr(hf, "pooler_output") else hf[0]
    torch.testing.assert_close(ours[0], hf, rtol=1e-5, atol=1e-5)


def test_side_branch_reproduces_the_scoring_layer_attention(tiny):
    x = pixels(tiny, 1)
    hidden = tiny.hidden_before_scoring(x)
    q, k, scale = tiny.scoring_qk(hidden)
    ours = head_mean_attention(q, k, scale)
    tower = tiny.model.model.vision_tower
    out = tower(x, output_attentions=True)
    theirs = out.attentions[tiny.vision.layers_run - 1].mean(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_attention(q, k, scale), theirs[:, 0, 1:], rtol=1e-5, atol=1e-6)


def test_the_unused_last_layer_never_runs(tiny):
    calls = []
    last = tiny.model.model.vision_tower.encoder.layers[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny.scoring_layer(tiny.hidden_before_scoring(pixels(tiny)))
    finally:
        handle.remove()
    assert calls == []


def test_processor_and_chat_template(tiny):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = tiny.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is shown? ASSISTANT:"
    image = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    inputs = tiny.processor(images=image, text=prompt, return_tensors="pt")
    view = tiny.vision.views[0]
    assert int((inputs["input_ids"] == tiny.text.image_token_id).sum()) == view.num_patches
    assert inputs["input_ids"][0, 0].item() == tiny.text.bos_token_id
    assert inputs["pixel_values"].shape == (1, 3, *view.image_size)
    out = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_clip_side_for_gridprune(tiny):
    assert tiny.clip is not None
    ids = tiny.clip.tokenizer("a red car on the left", return_tensors="pt")["input_ids"]
    assert ids[0, -1].item() == tiny.text.eos_token_id  # CLIP pools at end-of-text
    t = tiny.text_embeds(ids)
    assert t.shape == (1, tiny.clip.projection_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(1))
    patches = tiny.select_patches(tiny.scoring_layer(tiny.hidden_before_scoring(pixels(tiny))))
    assert tiny.joint_embeds(patches).shape == (1, tiny.vision.views[0].num_patches, tiny.clip.projection_dim)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_on_the_model_features(tiny, name):
    x = pixels(tiny, 2)
    hidden = tiny.hidden_before_scoring(x)
    features = tiny.scoring_layer(hidden)
    text = None
    if name == "gridprune":
        text = tiny.text_embeds(tiny.clip.tokenizer("the dog", return_tensors="pt")["input_ids"])
    ctx = tiny.score_context(hidden, features, text)
    spec = METHODS[name]
    view = tiny.vision.views[0]
    module = spec.build(spec.resolve_k(view.num_patches, view.grid, keep=0.25), view.grid, True)
    indices, tokens = module(ctx)
    assert indices.shape == (1, module.k) and tokens.shape[1] == module.k
    kept = indices[0].tolist()
    assert kept == sorted(kept) and len(set(kept)) == module.k
    if module.stage == "pre" and name != "pool":
        assert torch.equal(tokens, ctx.patches[:, indices[0]])
    # methods that never score post-projector features must not have run the projector over all N tokens
    assert ("projected" in ctx._cache) == (module.stage == "post")


def test_tiny_tokenizer_is_deterministic():
    from vlmprune.models.tiny_tokenizer import build_tokenizer

    assert build_tokenizer().to_str() == build_tokenizer().to_str()


def test_not_found_is_one_clear_line(tmp_path):
    with pytest.raises(VlmpruneError, match="'nobody/no-such-model' not found.*Hugging Face cache") as err:
        resolve_path("nobody/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(VlmpruneError, match="has no config.json"):
        resolve_path(str(tmp_path))


def write_config(folder, model_type):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_planned_and_unknown_architectures_are_named(tmp_path):
    with pytest.raises(VlmpruneError, match="LLaVA-OneVision .* not supported"):
        load_model(str(write_config(tmp_path / "q", "llava_onevision")))
    with pytest.raises(VlmpruneError, match="unknown model type 'bert'"):
        load_model(str(write_config(tmp_path / "b", "bert")))


def test_pickled_weights_are_refused(tmp_path):
    folder = write_config(tmp_path / "l", "llava")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(VlmpruneError, match="no .safetensors weights"):
        load_model(str(folder))
