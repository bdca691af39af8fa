"""Qwen3-VL's ``--image-size``: each side a multiple of 32 (patch 16 x merge 2). The preprocessing itself is the
Qwen2-VL image processor's at patch 16 (``models/qwen2_5_vl/preprocess.QwenPreprocessor`` reads the patch size from
the manifest); torch-free."""

from __future__ import annotations

from vlmprune.models.qwen2_5_vl import preprocess as qwen2_5

FACTOR = 32


def parse_image_size(text: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (height, width), each a positive multiple of 32."""
    return qwen2_5.parse_image_size(text, FACTOR, 4096, "Qwen3-VL: patch 16 x merge 2")


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """``--image-size``: one or more ``HxW``, comma-separated."""
    return qwen2_5.parse_image_sizes(text, parse_image_size)
