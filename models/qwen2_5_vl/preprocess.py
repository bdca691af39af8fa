"""Qwen2-VL image preprocessing at a static bucket size, with numpy + Pillow (torch-free).

transformers' ``Qwen2VLImageProcessor`` resizes each image to ``smart_resize`` of its own size (a multiple of 28
per side near its area); a bundle's vision graph has one static size, so the runtime resizes to the bucket's size
instead and then does exactly what the processor does: Pillow resize of the RGB uint8 image, rescale, normalise,
and patchify into the flattened patch sequence (merge groups in raster order of the merged grid, the four patches
of a group consecutive, each patch ``C x T x P x P`` with the frame repeated ``T`` times). For an image whose
``smart_resize`` is the bucket size the output equals the processor's (``tests/test_qwen2_5_vl.py``).

Written by hand because the runtime may not import transformers; the patchify is three numpy lines.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vlmprune.errors import VlmpruneError

from vlmprune.runtime.preprocess import FILTERS, to_rgb


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (the size the processor would choose
    for this image; the runtime uses it to pick the closest bucket)."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise VlmpruneError(f"an image of {width}x{height} has an aspect ratio above 200",
                            "crop it to a less extreme aspect ratio first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(x: np.ndarray, patch: int, temporal: int, merge: int) -> np.ndarray:
    """[C, H, W] -> [N, C*T*P*P] in the processor's order (``Qwen2VLImageProcessor.patchify``)."""
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    p = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(p.reshape(gh * gw, c * temporal * patch * patch), dtype=np.float32)


def _int_field(constants: dict, key: str, default: int, high: int, where: str) -> int:
    value = constants.get(key, default)
    if type(value) is not int or not 1 <= value <= high:
        raise VlmpruneError(f"the manifest's {where}.{key} must be an integer in 1..{high}, got {str(value)[:40]}",
                            "re-export the bundle")
    return value


def _floats(value, n: int, where: str, positive: bool = False) -> None:
    if (not isinstance(value, list) or len(value) != n
            or any(type(x) not in (int, float) or not math.isfinite(x) or (positive and x <= 0) for x in value)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise VlmpruneError(f"the manifest's {where} must be {n} {kind}, got {str(value)[:60]}", "re-export the bundle")


def check_qwen_constants(constants: dict) -> None:
    """The manifest's Qwen2-VL preprocessing fields the generic schema leaves to the family: patch, temporal patch
    and merge sizes (positive, bounded: 0 divided by zero, a negative size made negative arrays). Called by
    ``QwenPreprocessor`` when a bundle's pipeline opens."""
    for key, default, high in (("patch_size", 14, 1024), ("temporal_patch_size", 2, 16), ("merge_size", 2, 16)):
        _int_field(constants, key, default, high, "preprocessing")


def check_auxiliary_clip(aux) -> None:
    """GridPrune's ``auxiliary_clip`` block (size, resample, mean, std, rescale_factor): types, ranges and
    finiteness, so NaN never reaches the graph and a bad size or filter is one line, not a traceback. Called by
    the Qwen pipeline when it opens a bundle that has the block."""
    if not isinstance(aux, dict):
        raise VlmpruneError(f"the manifest's auxiliary_clip must be an object, got {type(aux).__name__}",
                            "re-export the bundle")
    _int_field(aux, "size", 0, 4096, "auxiliary_clip")
    if aux.get("resample", "bicubic") not in FILTERS:
        raise VlmpruneError(f"the manifest's auxiliary_clip.resample {str(aux.get('resample'))[:30]!r} is not one of "
                            f"{', '.join(FILTERS)}", "re-export the bundle")
    _floats(aux.get("mean"), 3, "auxiliary_clip.mean")
    _floats(aux.get("std"), 3, "auxiliary_clip.std", positive=True)
    if "rescale_factor" in aux:
        _floats([aux["rescale_factor"]], 1, "auxiliary_clip.rescale_factor", positive=True)


def check_qwen_buckets(manifest: dict, constants: dict) -> None:
    """Fields that the graphs also state, cross-checked when the pipeline opens: each view's and bucket's merged
    grid is its image size over ``patch_size * merge_size``, its graph's ``pixel_values`` rows are the pre-merge
    patches, and an unpruned bucket keeps the whole merged grid. So a ``merge_size`` or a grid that the graph does
    not use is one line, not a wrong stitch (``check_io`` then holds the recorded shapes to the graph's)."""
    patch, merge = constants.get("patch_size", 14), constants.get("merge_size", 2)
    step = patch * merge

    def expect(where: str, size, grid) -> None:
        h, w = size
        if h % step or w % step or list(grid) != [h // step, w // step]:
            raise VlmpruneError(f"the manifest's {where} grid {grid} is not the {h}x{w} image over {patch} px patches "
                                f"merged {merge}x{merge}", "re-export the bundle")

    view = manifest["vision"]["view"]
    expect("vision.view", view["image_size"], view["grid"])
    for b in manifest["vision"]["buckets"]:
        size, grid = b.get("image_size", view["image_size"]), b.get("grid", view["grid"])
        expect(f"bucket {b['name']}", size, grid)
        rows = (size[0] // patch) * (size[1] // patch)
        pixels = next((e["shape"] for e in b["inputs"] if e["kind"] == "pixel_values"), None)
        if pixels and type(pixels[0]) is int and pixels[0] != rows:
            raise VlmpruneError(f"the manifest's bucket {b['name']} takes {pixels[0]} patch rows, but its "
                                f"{size[0]}x{size[1]} image has {rows} {patch} px patches", "re-export the bundle")
        if b["method"] == "none" and b["k"] != grid[0] * grid[1]:
            raise VlmpruneError(f"the manifest's unpruned bucket {b['name']} has k {b['k']}, but its merged grid "
                                f"{grid} holds {grid[0] * grid[1]} tokens", "re-export the bundle")


class QwenPreprocessor:
    """``image -> pixel_values [N, C*T*P*P] float32`` at the bucket size ``crop_size`` of the manifest's
    ``preprocessing`` block (kind ``qwen2_vl``)."""

    def __init__(self, constants: dict):
        self.c = constants
        if constants["resample"] not in FILTERS:
            raise VlmpruneError(f"unknown resample filter {constants['resample']!r} in the manifest", "re-export")
        check_qwen_constants(constants)
        self.size = tuple(int(x) for x in constants["crop_size"])  # (height, width)
        self.patch = int(constants.get("patch_size", 14))
        self.temporal = int(constants.get("temporal_patch_size", 2))
        self.merge = int(constants.get("merge_size", 2))
        factor = self.patch * self.merge
        if self.size[0] % factor or self.size[1] % factor:
            raise VlmpruneError(f"the manifest's image size {self.size} is not a multiple of {factor}", "re-export")
        self.mean = np.asarray(constants["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(constants["std"], np.float32).reshape(3, 1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        """The pre-merge patch grid (gh, gw)."""
        return self.size[0] // self.patch, self.size[1] // self.patch

    def __call__(self, image: Image.Image) -> np.ndarray:
        c = self.c
        if c.get("do_convert_rgb", True) or image.mode != "RGB":
            image = to_rgb(image)
        h, w = self.size
        if c["do_resize"] and image.size != (w, h):
            image = image.resize((w, h), FILTERS[c["resample"]])
        elif image.size != (w, h):
            raise VlmpruneError(f"the image is {image.size[0]}x{image.size[1]} and the bundle takes {w}x{h} with "
                                "resizing off", "resize the image to the bundle's size")
        x = np.asarray(image).astype(np.float32).transpose(2, 0, 1)
        if c["do_rescale"]:
            x = x * np.float32(c["rescale_factor"])
        if c["do_normalize"]:
            x = (x - self.mean) / self.std
        return patchify(x, self.patch, self.temporal, self.merge)


def clip_view(image: Image.Image, constants: dict) -> np.ndarray:
    """GridPrune's auxiliary-CLIP input ``[1, 3, S, S]``: the whole image resized to the CLIP's square input (the
    same stretched view the bucket's resize gives, so the relevance map and the merged grid cover the same pixels;
    a center crop would drop the sides of the image the Qwen encoder sees), rescaled and normalised with the CLIP
    processor's constants (``manifest["auxiliary_clip"]``: size, resample, mean, std)."""
    size = int(constants["size"])
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), FILTERS[constants.get("resample", "bicubic")])
    x = np.asarray(image).astype(np.float32).transpose(2, 0, 1) * np.float32(constants.get("rescale_factor", 1 / 255))
    mean = np.asarray(constants["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(constants["std"], np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(((x - mean) / std)[None], dtype=np.float32)


def parse_image_size(text: str, factor: int = 28, largest: int = 4032, family: str = "Qwen2.5-VL: patch 14 x merge 2"
                     ) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (height, width), each a positive multiple of ``factor`` (patch x
    merge)."""
    try:
        parts = [int(p) for p in str(text).lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < factor or any(p % factor for p in parts) or max(parts) > largest:
        raise VlmpruneError(f"image size {text!r} is not HxW with each side a multiple of {factor} in "
                            f"{factor}..{largest}", f"give e.g. --image-size 448x448 ({family})")
    return parts[0], parts[1]


def parse_image_sizes(text: str, parse=parse_image_size) -> list[tuple[int, int]]:
    """``--image-size``: one or more ``HxW``, comma-separated."""
    sizes = list(dict.fromkeys(parse(part.strip()) for part in str(text).split(",") if part.strip()))
    if not sizes:
        raise VlmpruneError(f"--image-size {text!r} names no size", "give e.g. --image-size 448x448, or leave it out")
    return sizes
