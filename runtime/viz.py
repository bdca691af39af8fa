"""Pictures of what a method keeps: the model's view of the image, kept patches bright, dropped ones dimmed.

Pillow only, so it runs at the edge like the rest of the runtime."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PANEL = 336
_LABEL_H = 22


def model_view(image: Image.Image, preprocess) -> Image.Image:
    """The crop of ``image`` the model sees, at PANEL x PANEL."""
    from .preprocess import to_rgb

    box = preprocess.crop_box(image.size)
    return to_rgb(image).crop(tuple(int(round(v)) for v in box)).resize((PANEL, PANEL), Image.Resampling.BICUBIC)


def overlay(view: Image.Image, kept: list[int], grid: tuple[int, int], label: str) -> Image.Image:
    h, w = grid
    mask = np.zeros(h * w, bool)
    mask[np.asarray(kept, int)] = True
    cell = np.kron(mask.reshape(h, w), np.ones((PANEL // h + 1, PANEL // w + 1), bool))[:PANEL, :PANEL]
    arr = np.asarray(view, np.float32)
    arr = np.where(cell[..., None], arr, arr * 0.25 + 20)  # dim what was dropped
    panel = Image.new("RGB", (PANEL, PANEL + _LABEL_H), (255, 255, 255))
    panel.paste(Image.fromarray(arr.astype(np.uint8)), (0, _LABEL_H))
    draw = ImageDraw.Draw(panel)
    sy, sx = PANEL / h, PANEL / w
    for i in np.flatnonzero(mask):  # thin outline on each kept patch
        r, c = divmod(int(i), w)
        draw.rectangle([c * sx, _LABEL_H + r * sy, (c + 1) * sx - 1, _LABEL_H + (r + 1) * sy - 1], outline=(255, 210, 0))
    draw.text((6, 5), label, fill=(0, 0, 0))
    return panel


def compose(rows: list[list[Image.Image]], pad: int = 6) -> Image.Image:
    cols = max(len(r) for r in rows)
    cw, ch = PANEL + pad, PANEL + _LABEL_H + pad
    sheet = Image.new("RGB", (cols * cw + pad, len(rows) * ch + pad), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, panel in enumerate(row):
            sheet.paste(panel, (pad + x * cw, pad + y * ch))
    return sheet
