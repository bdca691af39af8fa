"""Every registered preset, whatever its family: it loads through the family registry with its declared
transformers class, its geometry follows its config, the adapter's pieces reproduce the library's forward, and the
runtime's preprocessing (the family's recipe) reproduces the preset's own image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmprune.models import PRESETS, load_model
from vlmprune.models.registry import families
from vlmprune.sample import make_sample_image


@pytest.fixture(scope="module", params=sorted(PRESETS))
def adapter(request):
    torch.set_grad_enabled(False)
    return load_model(request.param)


def test_preset_loads_through_its_family(adapter):
    spec = PRESETS[adapter.source]
    family = families()[spec.family]
    assert adapter.family is family and adapter.arch == family.model_type
    assert type(adapter.model).__name__ == family.transformers_class
    assert adapter.preprocessing.kind == family.recipe.preprocess
    family.check_needs("any", {"projected"})


def test_geometry_follows_the_config(adapter):
    vcfg = adapter.model.config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    for view in adapter.vision.views:
        assert view.image_size == (vcfg.image_size, vcfg.image_size) and view.grid == (side, side)
        assert view.has_cls == adapter.family.capabilities.has_cls
    assert adapter.preprocessing.crop_size == (vcfg.image_size, vcfg.image_size)
    assert adapter.vision.layers_run == adapter.vision.feature_layer % (vcfg.num_hidden_layers + 1)


def test_pieces_reproduce_the_library_forward(adapter):
    size = adapter.vision.views[0].image_size
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    ours = adapter.project(adapter.select_patches(adapter.scoring_layer(adapter.hidden_before_scoring(x))))
    torch.testing.assert_close(ours, adapter.reference_image_features(x), rtol=1e-5, atol=1e-5)


def test_runtime_preprocessing_reproduces_the_processor(adapter):
    from vlmprune.runtime.anyres import AnyresPreprocessor
    from vlmprune.runtime.preprocess import Preprocessor

    image = make_sample_image(517, 263)
    theirs = adapter.processor.image_processor(image, return_tensors="np")["pixel_values"]
    constants = adapter.preprocessing.to_dict()
    if adapter.preprocessing.kind == "anyres":
        ours, _, layout = AnyresPreprocessor(constants, adapter.vision.views[0].grid[0])(image)
        theirs = theirs[0][: layout.num_views]
    else:
        ours = Preprocessor(constants)(image)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) <= 1e-5
