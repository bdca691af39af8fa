"""Checks of the Python API's arguments (``vlmprune.eval.PrunedVLM``): each bad value is one ``ArgumentError``
naming the argument, never a TypeError or AttributeError from deep inside the pipeline. Images may be a path, a
PIL image or a numpy array, as transformers' image processors take them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from vlmprune.errors import ArgumentError

from .preprocess import MAX_PIXELS

GENERATE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed")


def _name(value) -> str:
    return type(value).__name__


def check_keep(keep) -> float | None:
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"keep must be a number in (0, 1], got {_name(keep)} {str(keep)[:40]!r}",
                            "pass e.g. keep=0.25")
    keep = float(keep)
    if not (math.isfinite(keep) and 0 < keep <= 1):
        raise ArgumentError(f"keep {keep} is outside (0, 1]", "pass e.g. keep=0.25")
    return keep


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an integer, got {_name(value)} {str(value)[:40]!r}",
                            f"pass an integer >= {low}")
    if value < low:
        raise ArgumentError(f"{name} {value} must be at least {low}", f"pass an integer >= {low}")
    return int(value)


def check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{name} must be a number, got {_name(value)} {str(value)[:40]!r}", "pass a number")
    return float(value)


def check_options(options: dict) -> dict:
    """``generate``'s keyword options: known names and typed values (their ranges are checked by the pipeline)."""
    unknown = sorted(set(options) - set(GENERATE_OPTIONS))
    if unknown:
        raise ArgumentError(f"unknown option {unknown[0]!r}", f"the options are {', '.join(GENERATE_OPTIONS)}")
    out = dict(options)
    if "max_new_tokens" in out:
        out["max_new_tokens"] = check_int("max_new_tokens", out["max_new_tokens"], 1)
    for name in ("temperature", "top_p"):
        if name in out:
            out[name] = check_float(name, out[name])
    if out.get("seed") is not None:
        out["seed"] = check_int("seed", out["seed"], 0)
    return out


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise ArgumentError(f"prompt must be a string, got {_name(prompt)}", "pass the question as text")
    return prompt


def from_array(array: np.ndarray) -> Image.Image:
    """An RGB picture from a numpy array: [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4; uint8 as it is, floats
    in [0, 1] scaled to 0-255 (transformers' ``to_pil_image`` rule), floats above 1 taken as 0-255."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))) or 0 in a.shape:
        raise ArgumentError(f"image array has shape {tuple(a.shape)}", "pass [H, W], [H, W, 3/4] or [3, H, W]")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ArgumentError(f"image array is {a.shape[1]}x{a.shape[0]}, over the {MAX_PIXELS // 10**6} MP limit",
                            "downscale it first")
    if a.dtype == np.uint8:
        pass
    elif a.dtype.kind in "fiu" and a.dtype != np.bool_:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ArgumentError("image array holds NaN or inf", "pass finite pixel values")
        if f.min() < 0 or f.max() > 255:
            raise ArgumentError(f"image array values span {f.min():g}..{f.max():g}", "pass 0-255, or floats in 0-1")
        if a.dtype.kind == "f" and f.max() <= 1.0:
            f = f * 255.0
        a = np.round(f).astype(np.uint8)
    else:
        raise ArgumentError(f"image array has dtype {a.dtype}", "pass uint8 (0-255) or floats (0-1)")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def check_image(image):
    """A path (str or Path, read later with the runtime's checks), a PIL image (decoded here, so a truncated file
    is one line) or a numpy array."""
    if isinstance(image, (str, Path)):
        return image
    if isinstance(image, np.ndarray):
        return from_array(image)
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_PIXELS:
            raise ArgumentError(f"image is {image.width}x{image.height}, over the {MAX_PIXELS // 10**6} MP limit",
                                "downscale it first")
        try:
            image.load()  # a lazily opened file decodes here: truncated or corrupt data is one line, not OSError
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ArgumentError(f"image cannot be decoded ({str(exc)[:120]})", "pass a complete image file") from None
        return image
    raise ArgumentError(f"image must be a path, a PIL image or a numpy array, got {_name(image)}",
                        "pass e.g. 'photo.jpg'")


def message_parts(message) -> tuple[object, str]:
    """VLMEvalKit's message ``[{"type": "image", "value": ...}, {"type": "text", "value": ...}]``: the one image
    and the text parts joined with newlines."""
    if not isinstance(message, (list, tuple)):
        raise ArgumentError(f"message must be a list of parts, got {_name(message)}",
                            "pass [{'type': 'image', 'value': PATH}, {'type': 'text', 'value': TEXT}]")
    for n, part in enumerate(message):
        if not isinstance(part, dict):
            raise ArgumentError(f"message part {n} is a {_name(part)}, not a dict",
                                "each part is {'type': 'image' or 'text', 'value': ...}")
        if part.get("type") not in ("image", "text") or "value" not in part:
            raise ArgumentError(f"message part {n} has type {str(part.get('type'))[:30]!r} or no value",
                                "each part is {'type': 'image' or 'text', 'value': ...}")
        if part["type"] == "text" and not isinstance(part["value"], str):
            raise ArgumentError(f"message part {n} is text whose value is a {_name(part['value'])}",
                                "a text part's value is a string")
    images = [p["value"] for p in message if p["type"] == "image"]
    if len(images) != 1:
        raise ArgumentError(f"the message holds {len(images)} images", "vlmprune bundles take exactly one image")
    return images[0], "\n".join(p["value"] for p in message if p["type"] == "text")
