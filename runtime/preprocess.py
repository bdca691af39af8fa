"""Image loading and preprocessing with numpy + Pillow, from the manifest's constants.

Mirrors the ``transformers`` CLIP image processor: RGB conversion (transparent images composited on white),
resize of the shortest edge with the processor's filter (the long edge truncated as transformers does), center
crop, rescale, normalise. Odd inputs are handled explicitly: 16-bit images are scaled to 8 bits rather than
clipped, palette and grayscale images are expanded, and huge or corrupt files get a clear error.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmprune.errors import VlmpruneError
from vlmprune.manifest import RESAMPLE

from .resample import FILTERS as RESAMPLE_FILTERS
from .resample import resize_window

MAX_PIXELS = 100_000_000  # 100 MP: larger inputs are refused before decoding
MAX_FILE_BYTES = 1 << 30  # no photo format needs more; a larger "image" is refused before it is read
# Above this many output pixels the shortest-edge resize computes only the part the center crop keeps (the same
# pixels, see resize_then_crop): a 10000x1 image would otherwise resize to 336 x 3,360,000. Below it the whole
# image is resized, as transformers does.
DIRECT_RESIZE_MAX_PIXELS = 16_000_000
# The one resample table: the manifest's names (its schema's list) -> Pillow's filters.
FILTERS = {name: Image.Resampling[name.upper()] for name in RESAMPLE}


def resample_name(value) -> str:
    """A processor config's ``resample`` (Pillow's enum value, or already a name) as the manifest's name."""
    if isinstance(value, str):
        return value
    try:
        return Image.Resampling(int(value)).name.lower()
    except (ValueError, TypeError):
        return "bicubic"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _open_regular(path: Path):
    """The file as a binary stream, refusing anything that is not a regular file. Opened non-blocking and checked on
    the open descriptor, so a FIFO cannot hang us and a file swapped after a check cannot slip through."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise VlmpruneError(f"image {path} does not exist", "check the path") from None
    except OSError as exc:
        raise VlmpruneError(f"cannot open image {path}: {exc.strerror}", "check the path and its permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise VlmpruneError(f"image {path} is {kind}", "pass an image file")
    if st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        raise VlmpruneError(f"image {path} is {st.st_size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES >> 20} MiB limit",
                            "downscale or recompress it first")
    return os.fdopen(fd, "rb")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, refusing missing, corrupt, oversized or non-regular ones with one clear
    line. The EXIF orientation is applied, as transformers' ``load_image`` does (a phone photo arrives upright)."""
    if isinstance(path, str) and _URL.match(path):  # before Path() collapses the "//"
        raise VlmpruneError(f"image {path} is a URL; vlmprune reads local files and does not fetch URLs",
                            "download it first (e.g. curl -L -o image.jpg URL) and pass the file")
    path = Path(path)
    with _open_regular(path) as f:
        try:
            # Our own limit replaces Pillow's bomb check while the header is read, so the message can name the size.
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(f)  # lazy: reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            w, h = image.size
            if w * h > max_pixels:
                raise VlmpruneError(
                    f"image {path} is {w}x{h} ({w * h / 1e6:.0f} MP), over the {max_pixels / 1e6:.0f} MP limit",
                    "downscale it first (the model sees 336x336 anyway)",
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except VlmpruneError:
            raise
        except Image.DecompressionBombError as exc:
            raise VlmpruneError(f"image {path} is too large to decode safely ({exc})", "downscale it first") from None
        except UnidentifiedImageError:  # its message names Pillow's file object, not the file
            raise VlmpruneError(f"cannot read image {path}: not an image format Pillow recognises ({_sniff(path)})",
                                "pass a valid PNG, JPEG, WebP, BMP or TIFF file") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise VlmpruneError(f"cannot read image {path}: corrupt or not a supported format ({exc})",
                                "pass a valid PNG, JPEG, WebP, BMP or TIFF file") from None
    return image


def _sniff(path: Path) -> str:
    """A few words on what the file is instead, for the error line."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "unreadable"
    if not head:
        return "the file is empty"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary content"
    return "it is a text file"


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB uint8 from any Pillow mode.

    16-bit and 32-bit integer images (``I;16*``, ``I``) are scaled by their bit depth to 8 bits (Pillow's own
    conversion clips them to 255, which turns most 16-bit photos white). Images with transparency are composited
    on white, as transformers does.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or arr.max() <= 65535 else 16843009.0
        return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(size: tuple[int, int], shortest: int) -> tuple[int, int]:
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest, int(shortest * long / short)  # truncation, as transformers
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_shortest_edge(image: Image.Image, shortest: int, resample: str) -> Image.Image:
    new_w, new_h = shortest_edge_size(image.size, shortest)
    if (new_w, new_h) == image.size:
        return image
    if new_w * new_h > DIRECT_RESIZE_MAX_PIXELS:
        raise VlmpruneError(f"an image of {image.size[0]}x{image.size[1]} resizes to {new_w}x{new_h} pixels",
                            "crop it to a less extreme aspect ratio first")
    return image.resize((new_w, new_h), FILTERS[resample])


def resize_then_crop(image: Image.Image, shortest: int, resample: str, crop: tuple[int, int]) -> Image.Image:
    """The part of the shortest-edge resize that a center crop of ``crop`` (height, width) keeps, computed directly
    and pixel for pixel equal to cropping the full resize (``runtime/resample.py`` says why Pillow's ``box`` is not):
    memory and time follow the crop, not the resized image."""
    new_w, new_h = shortest_edge_size(image.size, shortest)
    ch, cw = crop

    def span(new, c):  # rows (or columns) of the resized image that the crop keeps
        return ((new - c) // 2, c) if new >= c else (0, new)

    (left, width), (top, height) = span(new_w, cw), span(new_h, ch)
    window = (left, top, left + width, top + height)
    if resample not in RESAMPLE_FILTERS:  # nearest: Pillow samples, no rounding passes to reproduce
        w, h = image.size
        sx, sy = w / new_w, h / new_h
        return image.resize((width, height), FILTERS[resample], box=(left * sx, top * sy, (left + width) * sx,
                                                                     (top + height) * sy))
    return Image.fromarray(resize_window(np.asarray(image), (new_w, new_h), window, resample), image.mode)


def center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """``arr`` [H, W, C]; pads with zeros where the image is smaller than the crop (as transformers)."""
    h, w = arr.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), arr.shape[2]), arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


class Preprocessor:
    """``image -> pixel_values [1, 3, H, W] float32`` from the manifest's ``preprocessing`` block."""

    def __init__(self, constants: dict):
        self.c = constants
        if constants["resample"] not in FILTERS:
            raise VlmpruneError(f"unknown resample filter {constants['resample']!r} in the manifest", "re-export")
        self.mean = np.asarray(constants["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(constants["std"], np.float32).reshape(3, 1, 1)

    def crop_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region of the original image (left, top, right, bottom, in its pixels) that the model sees."""
        w, h = size
        s = self.c["resize_shortest_edge"] / min(w, h) if self.c["do_resize"] else 1.0
        rw, rh = (w * s, h * s)
        ch, cw = self.c["crop_size"]
        left, top = max(0, (rw - cw) // 2), max(0, (rh - ch) // 2)
        return left / s, top / s, (left + min(cw, rw)) / s, (top + min(ch, rh)) / s

    def __call__(self, image: Image.Image) -> np.ndarray:
        c = self.c
        if c.get("do_convert_rgb", True) or image.mode != "RGB":
            image = to_rgb(image)
        if c["do_resize"]:
            new_w, new_h = shortest_edge_size(image.size, c["resize_shortest_edge"])
            if c["do_center_crop"] and new_w * new_h > DIRECT_RESIZE_MAX_PIXELS:
                image = resize_then_crop(image, c["resize_shortest_edge"], c["resample"], tuple(c["crop_size"]))
            else:
                image = resize_shortest_edge(image, c["resize_shortest_edge"], c["resample"])
        arr = np.asarray(image)
        if c["do_center_crop"]:
            arr = center_crop(arr, *c["crop_size"])
        x = arr.astype(np.float32).transpose(2, 0, 1)
        if c["do_rescale"]:
            x = x * np.float32(c["rescale_factor"])
        if c["do_normalize"]:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x[None], dtype=np.float32)
