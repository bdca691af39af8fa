"""``prune-viz`` for LLaVA-NeXT (anyres) bundles: per bucket, the base-view panel (the whole image squeezed to the
view, as the model sees it) and the raster panel: the image as the crops see it (resized to the best pinpoint),
cut to the unpadded tokens, one cell per raster token, kept ones bright and boxed, dropped ones dimmed. The panels
have ``viz``'s size, so ``viz.compose`` lays them out like any other row. Pillow + numpy only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vlmprune.models.llava_next.geometry import fit_size, unpadded_span
from vlmprune.runtime.preprocess import to_rgb
from vlmprune.runtime.viz import BACKGROUND, BOX, INK, LINE_H, NOTE_INK, PANEL, PANEL_HEADER_H, _fit, _font, cell_edges, dim, overlay


def canvas(image: Image.Image, layout) -> Image.Image:
    """The padded pinpoint canvas the crops are cut from (black padding), as the preprocessing builds it."""
    rgb = to_rgb(image)
    w, h = rgb.size
    th, tw = layout.pinpoint
    nh, nw = fit_size((h, w), (th, tw))
    out = Image.new("RGB", (tw, th), (0, 0, 0))
    out.paste(rgb.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return out


def raster_panel(image: Image.Image, layout, size_hw, kept: list[int], title: str, note: str = "") -> Image.Image:
    """The unpadded raster over the image; ``kept``: raster positions ``r * width + c`` of the padded raster."""
    top, bottom, left, right = unpadded_span(size_hw, layout.raster)
    rh, rw = bottom - top, right - left
    if rh <= 0 or rw <= 0:  # a 10000x1 image: unpadding leaves no raster row (or column), as in the model
        return _empty_panel(title, f"none: the image is under one token {'row' if rh <= 0 else 'column'} high"
                                   if rh <= 0 else "none: the image is under one token column wide")
    cell = layout.view // layout.side  # pixels of the canvas per token
    region = canvas(image, layout).crop((left * cell, top * cell, right * cell, bottom * cell))
    scale = PANEL / max(region.size)
    pw, ph = max(1, round(region.width * scale)), max(1, round(region.height * scale))
    arr = np.asarray(region.resize((pw, ph), Image.Resampling.BICUBIC), np.float32)
    mask = np.zeros((rh, rw), bool)
    width = layout.raster[1]
    for i in kept:
        r, c = divmod(int(i), width)
        mask[r - top, c - left] = True
    ys, xs = cell_edges(rh, ph), cell_edges(rw, pw)
    rows = np.searchsorted(ys, np.arange(ph), side="right") - 1
    cols = np.searchsorted(xs, np.arange(pw), side="right") - 1
    arr = np.where(mask[rows[:, None], cols[None, :]][..., None], arr, dim(arr))
    panel = Image.new("RGB", (PANEL, PANEL_HEADER_H + PANEL), BACKGROUND)
    ox, oy = (PANEL - pw) // 2, PANEL_HEADER_H + (PANEL - ph) // 2
    panel.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), (ox, oy))
    draw = ImageDraw.Draw(panel)
    if min(ph / rh, pw / rw) >= MIN_BOXED_CELL:
        for r, c in zip(*np.nonzero(mask)):
            draw.rectangle([ox + xs[c], oy + ys[r], ox + xs[c + 1] - 1, oy + ys[r + 1] - 1], outline=BOX)
    else:  # boxes this small would be a mesh hiding the picture: outline the kept regions instead
        _outline(draw, mask, xs, ys, ox, oy)
        note = f"{note}; kept regions outlined" if note else "kept regions outlined"
    font = _font()
    draw.text((2, 1), _fit(draw, title, PANEL - 4, font), fill=INK, font=font)
    if note:
        draw.text((2, 1 + LINE_H), _fit(draw, note, PANEL - 4, font), fill=NOTE_INK, font=font)
    return panel


# the row title's words for these panels
ANYRES_VIEW = "the whole image at the view size (base), and the crops' raster cut to the image (raster)"
MIN_BOXED_CELL = 10  # pixels: below this a box per kept token turns into a mesh


def _outline(draw: ImageDraw.ImageDraw, mask: np.ndarray, xs, ys, ox: int, oy: int) -> None:
    """The border between kept and dropped (or outside) cells, drawn once."""
    padded = np.pad(mask, 1)
    for r, c in zip(*np.nonzero(mask)):
        x0, x1, y0, y1 = ox + xs[c], ox + xs[c + 1] - 1, oy + ys[r], oy + ys[r + 1] - 1
        if not padded[r, c + 1]:  # above
            draw.line([x0, y0, x1, y0], fill=BOX)
        if not padded[r + 2, c + 1]:
            draw.line([x0, y1, x1, y1], fill=BOX)
        if not padded[r + 1, c]:
            draw.line([x0, y0, x0, y1], fill=BOX)
        if not padded[r + 1, c + 2]:
            draw.line([x1, y0, x1, y1], fill=BOX)


def _empty_panel(title: str, note: str) -> Image.Image:
    panel = Image.new("RGB", (PANEL, PANEL_HEADER_H + PANEL), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    font = _font()
    draw.text((2, 1), _fit(draw, title, PANEL - 4, font), fill=INK, font=font)
    draw.text((2, 1 + LINE_H), _fit(draw, note, PANEL - 4, font), fill=NOTE_INK, font=font)
    return panel


def bucket_panels(image: Image.Image, bucket: dict, view, outputs: dict, base_tokens: int) -> list[Image.Image]:
    """Two panels for one bucket: the base view (the whole image squeezed to the view) and the unpadded raster."""
    layout, size_hw = view.info["layout"], view.info["size_hw"]
    side = layout.side
    base_view = to_rgb(image).resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    base = outputs["base_indices"][0].tolist()
    count = int(outputs["raster_count"].reshape(-1)[0])
    raster = outputs["raster_indices"][0][:count].tolist()
    valid = int(layout.valid_mask(size_hw).sum())
    top, bottom, _, _ = unpadded_span(size_hw, layout.raster)
    return [overlay(base_view, base, (side, side),
                    f"{bucket['method']} keep {bucket['keep']}: base {len(base)}/{side * side}",
                    "base view: the whole image at the view size"),
            raster_panel(image, layout, size_hw, raster, f"raster {layout.name}: {count}/{valid} tokens",
                         f"+ {bottom - top} row newlines, always kept")]
