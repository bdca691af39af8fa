"""LLaVA-NeXT: the family registry, the tiny-llava-next preset, and torch-free anyres preprocessing and unpadding
against transformers' own LlavaNextImageProcessor / LlavaNextForConditionalGeneration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.models import PRESETS, load_model
from vlmprune.models.llava_next import LLAVA_V16_PINPOINTS
from vlmprune.models.registry import Capabilities, Family, RuntimeRecipe, families, family_for
from vlmprune.prune import METHODS
from vlmprune.models.llava_next.geometry import AnyresPreprocessor, select_best_resolution, unpadded_span
from vlmprune.sample import make_sample_image


@pytest.fixture(scope="module")
def nxt():
    torch.set_grad_enabled(False)
    return load_model("tiny-llava-next")


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_knows_both_families():
    fams = families()
    assert {"llava", "llava_next"} <= set(fams)
    assert fams["llava"].transformers_class == "LlavaForConditionalGeneration"
    assert fams["llava_next"].transformers_class == "LlavaNextForConditionalGeneration"
    assert fams["llava_next"].recipe.preprocess == "anyres" and fams["llava_next"].recipe.layout == "anyres_raster"
    with pytest.raises(VlmpruneError, match="LLaVA-OneVision .* not supported"):
        family_for("llava_onevision")
    with pytest.raises(VlmpruneError, match="unknown model type 'gpt2'"):
        family_for("gpt2")


def test_method_needs_are_checked_against_capabilities():
    no_cls = Family("x", "NoCLS", "X", "m:X", Capabilities(False, "feature", False), RuntimeRecipe("clip", "single_view", "1d"))
    with pytest.raises(VlmpruneError, match="'gridprune' needs a CLS token, a CLIP joint text-image space"):
        no_cls.check_needs("gridprune", METHODS["gridprune"].needs)
    no_cls.check_needs("fopru", METHODS["fopru"].needs)  # attention only: fine
    for fam in (f for f in families().values() if f.model_type.startswith("llava")):
        for name, spec in METHODS.items():
            fam.check_needs(name, spec.needs)  # both LLaVA families serve every method


def test_load_model_refuses_a_method_before_loading(monkeypatch):
    import vlmprune.models.llava_next as mod

    from dataclasses import replace

    crippled = replace(mod.FAMILY, capabilities=Capabilities(True, "feature", False))
    monkeypatch.setitem(families(), "llava_next", crippled)
    monkeypatch.setattr("transformers.LlavaNextForConditionalGeneration.from_pretrained",
                        lambda *a, **k: pytest.fail("loaded before the capability check"))
    with pytest.raises(VlmpruneError, match="gridprune.*CLIP joint"):
        load_model("tiny-llava-next", method="gridprune", needs=METHODS["gridprune"].needs)


# --- preset --------------------------------------------------------------------------------------------------------


def test_preset_has_next_geometry(nxt):
    cfg = nxt.model.config
    assert nxt.model.__class__.__name__ == "LlavaNextForConditionalGeneration"
    spec = PRESETS["tiny-llava-next"]
    assert spec.grid_pinpoints == LLAVA_V16_PINPOINTS  # llava-hf/llava-v1.6-*-hf's canvases
    assert cfg.image_grid_pinpoints == [list(p) for p in LLAVA_V16_PINPOINTS]
    size = cfg.vision_config.image_size
    assert (size, nxt.vision.patch_size) == (spec.image_size, spec.patch_size) and nxt.side == size // spec.patch_size
    assert [v.name for v in nxt.vision.views] == ["base", "crop"]
    assert all(v.grid == (nxt.side, nxt.side) and v.has_cls for v in nxt.vision.views)
    assert [lay.name for lay in nxt.layouts] == ["1x2", "2x1", "2x2", "3x1", "1x3"]
    most = 1 + max((h // size) * (w // size) for h, w in LLAVA_V16_PINPOINTS)  # the base view + the most crops
    assert max(lay.num_views for lay in nxt.layouts) == most
    assert nxt.image_newline.shape == (nxt.text.hidden_size,) and float(nxt.image_newline.abs().max()) > 0.1
    assert nxt.family.model_type == "llava_next"
    pre = nxt.preprocessing.to_dict()
    assert pre["kind"] == "anyres" and pre["grid_pinpoints"] == cfg.image_grid_pinpoints


def test_pieces_match_the_library_forward(nxt):
    size = nxt.vision.views[0].image_size
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))  # base + two crops (layout 1x2)
    hidden = nxt.hidden_before_scoring(x)
    ours = nxt.project(nxt.select_patches(nxt.scoring_layer(hidden)))
    out = nxt.model.model.vision_tower(x, output_hidden_states=True)
    theirs = nxt.project(out.hidden_states[nxt.vision.feature_layer][:, 1:])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --- anyres preprocessing parity ----------------------------------------------------------------------------------

S = PRESETS["tiny-llava-next"].image_size  # the base view's side
# (width, height): square, 2:1, 1:3, tiny, over 4000 px, and odd sizes that pad unevenly
SIZES = [(500, 500), (800, 400), (400, 800), (300, 900), (13, 20), (4100, 1500), (1000, S + 1), (S, 1009), (640, 480)]


def _photo(size, seed=0):
    w, h = size
    rng = np.random.default_rng(seed)
    small = np.asarray(make_sample_image(min(w, 640), min(h, 640)).resize((w, h)))
    return Image.fromarray(np.clip(small.astype(int) + rng.integers(-25, 25, small.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_anyres_preprocessing_matches_the_processor(nxt, size):
    image = _photo(size, seed=size[0])
    ours, hw, layout = AnyresPreprocessor(nxt.preprocessing.to_dict(), nxt.side)(image)
    theirs = nxt.processor.image_processor(image, return_tensors="np")
    pv = theirs["pixel_values"][0]
    n = layout.num_views
    assert hw == tuple(int(v) for v in theirs["image_sizes"][0]) == (size[1], size[0])
    assert layout.pinpoint == select_best_resolution(hw, nxt.model.config.image_grid_pinpoints)
    assert ours.shape == (n, 3, *nxt.vision.views[0].image_size) and ours.dtype == np.float32
    assert not pv[n:].any()  # the processor pads the batch with empty views beyond this layout's
    diff = float(np.abs(ours - pv[:n]).max())
    assert diff <= 1e-5, diff


def test_modes_and_alpha_follow_the_processor(nxt):
    rgba = _photo((700, 300)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 700)).astype(np.uint8)))
    for image in (rgba, _photo((300, 700)).convert("L")):
        ours, _, layout = AnyresPreprocessor(nxt.preprocessing.to_dict(), nxt.side)(image)
        theirs = nxt.processor.image_processor(image, return_tensors="np")["pixel_values"][0][: layout.num_views]
        assert float(np.abs(ours - theirs).max()) <= 1e-5


@pytest.mark.parametrize("size", SIZES + [(1, 1), (2000, 1), (1, 2000), (671, 673)])
def test_unpadding_and_token_count_match_transformers(nxt, size):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    w, h = size
    layout = AnyresPreprocessor(nxt.preprocessing.to_dict(), nxt.side).layout((h, w))
    rh, rw = layout.raster
    grid = torch.arange(rh * rw, dtype=torch.float32).reshape(1, rh, rw)
    kept = unpad_image(grid, (h, w))
    top, bottom, left, right = unpadded_span((h, w), layout.raster)
    assert torch.equal(kept, grid[:, top:bottom, left:right])
    assert layout.valid_mask((h, w)).sum() == kept.numel()
    expected = nxt.processor._get_number_of_features(h, w, *nxt.vision.views[0].image_size) - 1  # "default": no CLS
    assert layout.num_tokens((h, w), nxt.side**2) == expected


# --- the anyres selection rules against the single-view methods ----------------------------------------------------


def _crop_valid(n_crops, side, cut):
    valid = torch.ones(n_crops, side * side, dtype=torch.bool)
    valid[1, : cut * side] = False  # the second crop's top rows are padding
    return valid


def test_gprune_on_the_unpadded_raster_is_gprune_on_the_valid_tokens():
    from vlmprune.models.llava_next.graphs import dynamic_budget, gprune_scores_masked, select_masked
    from vlmprune.prune.gprune import gprune_select

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 300, 16, generator=g) + 0.8 * torch.randn(1, 1, 16, generator=g)
    valid = torch.zeros(1, 300, dtype=torch.bool)
    valid[0, 40:260] = True
    k = dynamic_budget(0.25, valid.float().sum(-1))
    assert int(k) == 55
    ours = select_masked(gprune_scores_masked(feats, valid, 0.5, 0.03, 5), valid, k, 75)[0, :55]
    theirs = gprune_select(feats[:, 40:260], 55)[0] + 40
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("method", ["fopru", "gridprune"])
def test_per_crop_methods_equal_the_single_view_method_on_whole_crops(method):
    from vlmprune.models.llava_next.graphs import dynamic_budget, gridprune_crops
    from vlmprune.prune.gridprune import gridprune_from_scores
    from vlmprune.prune.select import rank_desc, topk_ascending

    side, zones = 12, 4
    g = torch.Generator().manual_seed(1)
    r = torch.rand(2, side * side, generator=g) * 2 - 1
    s = torch.rand(2, side * side, generator=g)
    valid = _crop_valid(2, side, 5)
    k = dynamic_budget(0.25, valid.float().sum(-1))
    assert k.tolist() == [36.0, 21.0]  # round(0.25 * 12 * 12), round(0.25 * 12 * 7)
    if method == "gridprune":
        kept = gridprune_crops(r, s, valid, k, (side, side), zones, 1.0)
        whole = gridprune_from_scores(r[0:1], s[0:1], 36, (side, side), zones, 1.0)
    else:
        masked = torch.where(valid, s, torch.tensor(-3e38))
        kept = (rank_desc(masked) < k.unsqueeze(-1)) & valid
        whole = topk_ascending(s[0:1], 36)
    assert torch.nonzero(kept[0])[:, 0].tolist() == whole[0].tolist()  # a whole crop: the LLaVA-1.5 selection
    assert kept.sum(-1).tolist() == [36, 21] and not (kept & ~valid).any()  # padding is never selected


def test_layouts_given_twice_get_one_graph_each(nxt):
    from vlmprune.models.llava_next.export import plan_anyres
    from vlmprune.prune import get_method

    spec = get_method("gprune")
    options = spec.parse_options({})
    twice = plan_anyres(spec, options, nxt, [0.25], [], ["1x2", "2x1", "1x2"])
    once = plan_anyres(spec, options, nxt, [0.25], [], ["1x2", "2x1"])
    assert [b.name for b in twice] == [b.name for b in once] and len({b.name for b in twice}) == len(twice) == 4


def test_layouts_from_the_config_alone_are_the_adapters(nxt):
    """prune-bench finds the image's layout from config.json, without loading the weights the export then reads."""
    from vlmprune.models.llava_next.adapter import config_layouts

    assert config_layouts(nxt.path) == nxt.layouts
