"""Every registered preset, whatever its family: it loads through the family registry with its declared
transformers class, its geometry follows its config, the adapter's pieces reproduce the library's forward, and the
runtime's preprocessing (the family's recipe) reproduces the preset's own image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preset_geometry import preset_grid
from vlmprune.models import PRESETS, load_model
from vlmprune.sample import make_sample_image


@pytest.fixture(scope="module", params=sorted(PRESETS))
def adapter(request):
    torch.set_grad_enabled(False)
    return load_model(request.param)


def test_preset_loads_through_its_family(adapter):
    spec = PRESETS[adapter.source]
    from vlmprune.models.registry import family_of_preset

    family = family_of_preset(spec.name)
    assert adapter.family is family and adapter.arch == family.model_type
    assert type(adapter.model).__name__ == family.transformers_class
    assert adapter.preprocessing.kind == family.recipe.preprocess
    family.check_needs("any", {"projected"})


def test_geometry_follows_the_config(adapter):
    vcfg = adapter.model.config.vision_config
    # the spec-only grids that other test modules parametrise over (tests/preset_geometry.py) are the loaded ones
    assert {view.grid for view in adapter.vision.views} == {preset_grid(PRESETS[adapter.source])}
    if adapter.preprocessing.kind == "qwen2_vl":  # a static bucket size, merged 2x2 (the Qwen families' tests)
        (view,) = adapter.vision.views
        side = vcfg.patch_size * vcfg.spatial_merge_size
        assert view.grid == (view.image_size[0] // side, view.image_size[1] // side) and not view.has_cls
        assert adapter.vision.layers_run == vcfg.depth
        return
    side = vcfg.image_size // vcfg.patch_size
    for view in adapter.vision.views:
        assert view.image_size == (vcfg.image_size, vcfg.image_size) and view.grid == (side, side)
        assert view.has_cls == adapter.family.capabilities.has_cls
    assert adapter.preprocessing.crop_size == (vcfg.image_size, vcfg.image_size)
    assert adapter.vision.layers_run == adapter.vision.feature_layer % (vcfg.num_hidden_layers + 1)


def test_pieces_reproduce_the_library_forward(adapter):
    size = adapter.vision.views[0].image_size
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    if adapter.preprocessing.kind == "qwen2_vl":  # the processor's flattened patches [N, C*T*P*P]
        vcfg = adapter.model.config.vision_config
        p, t = vcfg.patch_size, vcfg.temporal_patch_size
        x = torch.randn(size[0] * size[1] // (p * p), 3 * t * p * p, generator=torch.Generator().manual_seed(0))
    ours = adapter.project(adapter.select_patches(adapter.scoring_layer(adapter.hidden_before_scoring(x))))
    torch.testing.assert_close(ours, adapter.reference_image_features(x), rtol=1e-5, atol=1e-5)


def test_runtime_preprocessing_reproduces_the_processor(adapter):
    from vlmprune.models.llava_next.geometry import AnyresPreprocessor
    from vlmprune.runtime.preprocess import Preprocessor

    image = make_sample_image(517, 263)
    theirs = adapter.processor.image_processor(image, return_tensors="np")["pixel_values"]
    constants = adapter.preprocessing.to_dict()
    if adapter.preprocessing.kind == "anyres":
        ours, _, layout = AnyresPreprocessor(constants, adapter.vision.views[0].grid[0])(image)
        theirs = theirs[0][: layout.num_views]
    elif adapter.preprocessing.kind == "qwen2_vl":  # at the bucket the processor itself picks for this image
        from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, smart_resize

        ip = adapter.processor.image_processor
        factor = ip.patch_size * ip.merge_size  # 28 for Qwen2.5-VL, 32 for Qwen3-VL
        adapter.set_image_size(smart_resize(263, 517, factor, ip.size["shortest_edge"], ip.size["longest_edge"]))
        ours = QwenPreprocessor(adapter.preprocessing.to_dict())(image)
    else:
        ours = Preprocessor(constants)(image)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) <= 1e-5
