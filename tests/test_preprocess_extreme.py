"""The CLIP preprocessing shortcut for extreme aspect ratios (a shortest-edge resize over 16 MP is computed only
where the center crop keeps it) against the reference: transformers' CLIP image processor (LLaVA-1.5's settings:
shortest edge 336, bicubic, 336x336 crop, CLIP mean/std), and Pillow's full resize cropped (what that processor does,
for images whose full resize is too big to make in a test)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmprune.runtime.preprocess import DIRECT_RESIZE_MAX_PIXELS, Preprocessor, shortest_edge_size
from vlmprune.runtime.resample import FILTERS, resize_window

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # openai/clip-vit-large-patch14-336
CONSTANTS = {"do_resize": True, "resize_shortest_edge": 336, "resample": "bicubic", "do_center_crop": True,
             "crop_size": [336, 336], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "mean": MEAN, "std": STD, "do_convert_rgb": True}


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def processor():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor  # 5.x names the PIL one
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3, do_center_crop=True,
               image_mean=MEAN, image_std=STD)


# the 3x500 and 50x8000, both orientations, and the 100:1 border of Image.resize's vertical-first rule
# (340x48300 shrinks in height and takes it; the others enlarge). Full resizes of 16-28 MP: the processor makes them.
AGAINST_PROCESSOR = [(3, 500), (500, 3), (50, 8000), (8000, 50), (4, 1000), (20, 4000), (30, 5000), (340, 48300)]


@pytest.mark.parametrize("size", AGAINST_PROCESSOR)
def test_extreme_aspect_ratios_match_the_clip_processor(processor, size):
    new_w, new_h = shortest_edge_size(size, 336)
    assert new_w * new_h > DIRECT_RESIZE_MAX_PIXELS  # the shortcut is what runs
    image = _noise(*size, seed=size[0])
    ours = Preprocessor(CONSTANTS)(image)
    theirs = processor(image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 336, 336)
    assert np.max(np.abs(ours - theirs)) <= 1e-5  # float32 rounding only: the same 8-bit pixels


# Full resizes of 34-54 MP (5x2384 is the third example): checked against Pillow's whole resize, cropped.
AGAINST_PILLOW = [(5, 2384), (2384, 5), (7, 3000), (1, 300), (300, 1)]


@pytest.mark.parametrize("size", AGAINST_PILLOW)
def test_huge_resizes_match_pillows_whole_resize(size):
    new_w, new_h = shortest_edge_size(size, 336)
    image = _noise(*size, seed=sum(size))
    left, top = (new_w - 336) // 2, (new_h - 336) // 2
    whole = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    want = whole[top : top + 336, left : left + 336]
    got = resize_window(np.asarray(image), (new_w, new_h), (left, top, left + 336, top + 336), "bicubic")
    assert np.array_equal(got, want)


@pytest.mark.parametrize("resample", sorted(FILTERS))
@pytest.mark.parametrize("size, new, window", [
    ((37, 23), (301, 187), (40, 60, 250, 100)),  # enlarge both ways
    ((300, 200), (71, 47), (5, 9, 60, 40)),  # shrink both ways (wide filter support)
    ((3, 400), (64, 333), (0, 100, 64, 140)),  # taller than 100:1, shrunk in height: vertical pass first
])
def test_every_filter_matches_pillow_on_any_window(resample, size, new, window):
    image = _noise(*size, seed=7)
    whole = np.asarray(image.resize(new, getattr(Image.Resampling, resample.upper())))
    left, top, right, bottom = window
    got = resize_window(np.asarray(image), new, window, resample)
    assert np.array_equal(got, whole[top:bottom, left:right])
