"""Qwen3-VL's ``--image-size``: each side a multiple of 32 (patch 16 x merge 2). The preprocessing itself is the
Qwen2-VL image processor's at patch 16 (``models/qwen2_5_vl/preprocess.QwenPreprocessor`` reads the patch size from
the manifest); torch-free."""

from __future__ import annotations

from vlmprune.errors import VlmpruneError

FACTOR = 32


def parse_image_size(text: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (height, width), each a positive multiple of 32."""
    try:
        parts = [int(p) for p in str(text).lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < FACTOR or any(p % FACTOR for p in parts) or max(parts) > 4096:
        raise VlmpruneError(f"image size {text!r} is not HxW with each side a multiple of {FACTOR} in {FACTOR}..4096",
                            "give e.g. --image-size 448x448 (Qwen3-VL: patch 16 x merge 2)")
    return parts[0], parts[1]


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """``--image-size``: one or more ``HxW``, comma-separated."""
    sizes = list(dict.fromkeys(parse_image_size(part.strip()) for part in str(text).split(",") if part.strip()))
    if not sizes:
        raise VlmpruneError(f"--image-size {text!r} names no size", "give e.g. --image-size 448x448, or leave it out")
    return sizes
