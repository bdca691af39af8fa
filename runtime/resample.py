"""Pillow's 8-bit resize, computed for a window of the output only: the pixels a center crop keeps of a resize too
large to make whole (a 3x500 image's shortest-edge resize to 336 is 336x56000).

Why not ``Image.resize(..., box=...)``: Pillow passes the box to C as 32-bit floats, so the filter's centres move by a
rounding error and the 8-bit result differs by a grey level or two; and ``Image.resize`` picks its pass order from the
requested size, which a crop changes (up to 25 grey levels off). Transformers resizes the whole image, so the window
must be exactly that resize's pixels. This is a transcription of Pillow's resampling (python-pillow/Pillow,
``src/libImaging/Resample.c``: the filters, ``precompute_coeffs``, ``normalize_coeffs_8bpc``, the 8-bit passes, and
``ImagingResampleInner``'s horizontal-then-vertical order; ``src/PIL/Image.py`` ``Image.resize``'s vertical-first rule
for very tall images), evaluated in the same double and integer arithmetic, for the wanted rows and columns.
``tests/test_runtime.py`` checks it against transformers' CLIP processor and against Pillow's full resize.
"""

from __future__ import annotations

import math

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of result, two for overshoot, the rest for the coefficients


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    px = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        # 0.54f and 0.46f are float literals in the C source: their float32 values, widened
        v = np.sin(px) / px * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(px))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, v))


def _sinc(x: np.ndarray) -> np.ndarray:
    px = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.sin(px) / px
    return np.where(x == 0.0, 1.0, v)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((-3.0 <= x) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


# name -> (filter, support), as Resample.c's BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS
FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "box": (_box, 0.5),
           "hamming": (_hamming, 1.0), "lanczos": (_lanczos, 3.0)}


def _coefficients(in_size: int, out_size: int, wanted: np.ndarray, resample: str):
    """``precompute_coeffs`` for the output positions ``wanted`` of a full-range resize (box 0..in_size), then
    ``normalize_coeffs_8bpc``: per position, the first source index and the fixed-point weights."""
    filt, support0 = FILTERS[resample]
    in1 = float(np.float32(in_size))  # the box reaches C as floats
    scale = in1 / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (wanted + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    inv = 1.0 / filterscale
    x = np.arange(ksize)
    w = filt(((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * inv)
    w = np.where(x[None, :] < xmax[:, None], w, 0.0)
    ww = np.zeros(len(wanted))
    for i in range(ksize):  # summed in the C loop's order, so the normalising total rounds the same way
        ww = ww + w[:, i]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    k = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, k


def _pass(src: np.ndarray, axis: int, in_size: int, out_size: int, wanted: np.ndarray, resample: str,
          offset: int = 0) -> np.ndarray:
    """One 8-bit pass along ``axis`` (0 rows, 1 columns) of ``src`` [H, W, C] uint8, for output indices ``wanted``;
    ``src`` may be a band of the source starting at index ``offset`` along ``axis``."""
    xmin, k = _coefficients(in_size, out_size, wanted, resample)
    # indices past the band or the window carry weight 0
    idx = np.minimum(xmin[:, None] - offset + np.arange(k.shape[1])[None, :], src.shape[axis] - 1)
    taps = np.take(src, idx, axis=axis).astype(np.int64)  # axis becomes (wanted, ksize)
    shape = [1] * taps.ndim
    shape[axis], shape[axis + 1] = k.shape
    ss = (1 << (PRECISION_BITS - 1)) + (taps * k.reshape(shape)).sum(axis=axis + 1)
    return np.clip(ss >> PRECISION_BITS, 0, 255).astype(np.uint8)  # clip8: an arithmetic shift, then clamp


def resize_window(arr: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int],
                  resample: str) -> np.ndarray:
    """``Image.fromarray(arr).resize(size, resample)`` cropped to ``window`` (left, top, right, bottom in the resized
    image), without making the rest. ``arr`` is [H, W, C] uint8."""
    h, w = arr.shape[:2]
    new_w, new_h = size
    left, top, right, bottom = window
    cols, rows = np.arange(left, right), np.arange(top, bottom)

    def horizontal(a):
        return a if new_w == w else _pass(a, 1, w, new_w, cols, resample)

    def vertical(a):
        return a if new_h == h else _pass(a, 0, h, new_h, rows, resample)

    if h > w * 100 and new_h < h:  # Image.resize: a very tall image it shrinks in height goes vertical first
        out = horizontal(vertical(arr))
    else:
        # ImagingResampleInner: horizontal first, over only the source rows the vertical pass then reads
        if new_h != h:
            xmin, k = _coefficients(h, new_h, rows, resample)
            r0, r1 = int(xmin.min()), int((xmin + k.shape[1]).max())
            out = _pass(horizontal(arr[r0:min(r1, h)]), 0, h, new_h, rows, resample, offset=r0)
        else:
            out = horizontal(arr)[top:bottom]
    if new_w == w:
        out = out[:, left:right]
    return out

