"""Calibration data: images preprocessed exactly as the runtime does (the manifest's constants), plus prompt
embeddings for text-guided buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.runtime.anyres import AnyresPreprocessor
from vlmprune.runtime.preprocess import Preprocessor, load_image, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Generic VQA-style prompts to pair with the images for GridPrune's text input.
PROMPTS = [
    "What is in the image?", "Describe the picture in detail.", "What color is the main object?",
    "How many people are there?", "Where is the car?", "What is written on the sign?",
    "Is there an animal in the picture?", "What is the person holding?",
]


def load_calibration_images(folder: Path, preprocessing: dict, num: int,
                            progress=None) -> tuple[np.ndarray | list, int]:
    """Up to ``num`` images of ``folder`` (sorted, recursive) and how many were skipped as unreadable: ``[n, 3, H, W]``
    float32 for single-view bundles; for anyres bundles the RGB images themselves (each layout's graph is fed every
    image tiled onto its own pinpoint, ``anyres_pixels``), reduced to at most the largest pinpoint's side, since the
    processor fits every image inside a pinpoint anyway (an extra resample is immaterial to activation ranges and
    keeps a few hundred photos in memory as a few hundred MB)."""
    if preprocessing.get("kind") == "qwen2_vl":  # Qwen2.5-VL graphs take flattened patches, not [n, 3, H, W]
        raise VlmpruneError(f"INT8 calibration of bundles with {preprocessing.get('kind')!r} preprocessing is not "
                            "supported yet", "build fp16 engines (prune-build --precision fp16) for this bundle")
    folder = Path(folder)
    if not folder.is_dir():
        raise VlmpruneError(f"calibration folder {folder} does not exist", "pass --images DIR with a few hundred photos")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlmpruneError(f"no images in {folder}", f"it needs files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    if preprocessing.get("kind") == "anyres":
        largest = max(max(int(x) for x in p) for p in preprocessing["grid_pinpoints"])

        def pre(image):
            image = to_rgb(image)
            image.thumbnail((largest, largest), Image.Resampling.BICUBIC)
            return [image]
    else:
        pre = Preprocessor(preprocessing)
    batches, skipped = [], 0
    iterator = progress(files, desc="preprocess", unit="img") if progress else files
    for path in iterator:
        if len(batches) >= num:
            break
        try:
            batches.append(pre(load_image(path)))
        except VlmpruneError:
            skipped += 1
    if hasattr(iterator, "close"):  # a bar left open by the early break would share its line with the next one
        iterator.close()
    if not batches:
        raise VlmpruneError(f"none of the {len(files)} images in {folder} could be read", "check the files")
    if isinstance(batches[0], list):
        return [image for batch in batches for image in batch], skipped
    return np.concatenate(batches), skipped


def anyres_pixels(preprocessing: dict, side: int, image, layout) -> dict[str, np.ndarray]:
    """An anyres graph's image inputs (by kind) for ``image`` tiled onto ``layout``, as the runtime makes them."""
    pixels, size_hw, _ = AnyresPreprocessor(preprocessing, side)(image, layout)
    return {"pixel_values": pixels, "valid_mask": layout.valid_mask(size_hw).astype(np.float32)}


class FeedReader:
    """An ONNX Runtime ``CalibrationDataReader`` over prepared feeds (also the shape ModelOpt takes as a dict)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)
