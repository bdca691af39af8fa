"""Calibration data: images prepared exactly as the runtime prepares them (the bundle's family hooks, from the
manifest's constants), plus prompt embeddings for text-guided buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.runtime.preprocess import load_image, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Generic VQA-style prompts to pair with the images for GridPrune's text input.
PROMPTS = [
    "What is in the image?", "Describe the picture in detail.", "What color is the main object?",
    "How many people are there?", "Where is the car?", "What is written on the sign?",
    "Is there an animal in the picture?", "What is the person holding?",
]


# Calibration photos are kept as RGB images at most this long on their longer side: every family's preprocessing
# fits the image into views of a few hundred pixels, so a further downscale is immaterial to activation ranges,
# and a few hundred photos stay a few hundred MB.
MAX_SIDE = 1344


def load_calibration_images(folder: Path, num: int, progress=None) -> tuple[list[Image.Image], int]:
    """Up to ``num`` images of ``folder`` (sorted, recursive) as RGB images, and how many were skipped as
    unreadable. Each bucket's graph gets them through the bundle's own family preprocessing
    (``calibration_feeds``), exactly as the runtime prepares a request."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VlmpruneError(f"calibration folder {folder} does not exist", "pass --images DIR with a few hundred photos")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlmpruneError(f"no images in {folder}", f"it needs files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    images, skipped = [], 0
    iterator = progress(files, desc="read", unit="img") if progress else files
    for path in iterator:
        if len(images) >= num:
            break
        try:
            image = to_rgb(load_image(path))
        except VlmpruneError:
            skipped += 1
            continue
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
        images.append(image)
    if hasattr(iterator, "close"):  # a bar left open by the early break would share its line with the next one
        iterator.close()
    if not images:
        raise VlmpruneError(f"none of the {len(files)} images in {folder} could be read", "check the files")
    return images, skipped


def family_runtime(bundle):
    """The bundle's family runtime hooks (its preprocessing, by the manifest's family), as the pipeline makes them."""
    from vlmprune.runtime.family import runtime_class

    emb = bundle.manifest["decoder"]["embeddings"]
    try:
        table = np.load(bundle.path(emb["file"]), mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise VlmpruneError(f"cannot read {emb['file']}: {str(exc)[:160]}", "re-export the bundle") from None
    return runtime_class(bundle.manifest)(bundle, table)


def image_inputs(family, bucket: dict, image: Image.Image) -> dict[str, np.ndarray]:
    """A bucket graph's image inputs by kind for ``image``, prepared by the family as for a request."""
    return family.prepare(image, bucket).values


class FeedReader:
    """An ONNX Runtime ``CalibrationDataReader`` over prepared feeds (also the shape ModelOpt takes as a dict)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)
