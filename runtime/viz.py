"""Pictures of what a method keeps: the model's view of the image, kept patches bright and boxed, dropped ones dimmed.

One geometry (``cell_edges``) places both the bright fills and the boxes, so they cannot drift apart on grids that do
not divide the panel. Each box is one visual token the LLM receives: a patch for the selecting methods, a 2 x 2 window
for ``pool`` (which averages every patch and drops none). Pillow only, so it runs at the edge like the rest of the
runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 336  # side of the drawn model view, in pixels
PAD = 8
FONT_SIZE = 13
LINE_H = 17
PANEL_HEADER_H = 2 * LINE_H + 4  # method / budget line, then a note line
ROW_TITLE_H = LINE_H + 6  # bundle name
SHEET_TITLE_H = 2 * LINE_H + 6  # image and prompt
LEGEND_H = 2 * LINE_H + 10

BOX = (255, 210, 0)  # outline of one visual token
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
NOTE_INK = (90, 90, 90)
# Methods whose tokens are averages of fixed windows rather than a subset of patches (prune/pool.py): window side.
POOLING = {"pool": 2}


def dim(arr: np.ndarray) -> np.ndarray:
    """How a dropped patch is drawn: darkened, still recognisable."""
    return arr * 0.25 + 20


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def cell_edges(n: int, size: int = PANEL) -> np.ndarray:
    """Pixel boundaries of ``n`` cells across ``size`` pixels (``n + 1`` integers; cell i spans [e[i], e[i+1]))."""
    return np.rint(np.arange(n + 1) * size / n).astype(int)


def pixel_cells(n: int, size: int = PANEL) -> np.ndarray:
    """The cell index of every pixel along one axis, from the same edges as the boxes."""
    edges = cell_edges(n, size)
    return np.searchsorted(edges, np.arange(size), side="right") - 1


def model_view(image: Image.Image, preprocess) -> Image.Image:
    """The crop of ``image`` the model sees, at PANEL x PANEL."""
    from .preprocess import to_rgb

    box = preprocess.crop_box(image.size)
    return to_rgb(image).crop(tuple(int(round(v)) for v in box)).resize((PANEL, PANEL), Image.Resampling.BICUBIC)


def view_words(image: Image.Image, preprocess) -> str:
    """How the panels show the image, from the region the preprocessing keeps: a crop, or the whole image."""
    w, h = image.size
    left, top, right, bottom = preprocess.crop_box(image.size)
    whole = left <= 0.5 and top <= 0.5 and right >= w - 0.5 and bottom >= h - 0.5
    return "the whole image, resized to the model's view" if whole else "the center crop the model sees, resized"


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def overlay(view: Image.Image, kept: list[int], grid: tuple[int, int], title: str, note: str = "",
            pool: int = 0) -> Image.Image:
    """One panel: ``title`` and ``note`` above the view; kept patches bright inside a box, dropped ones dimmed.

    ``pool`` > 0 draws a pooling method honestly: nothing is dimmed (every patch is averaged in) and each
    ``pool`` x ``pool`` window, one output token, gets a box."""
    h, w = grid
    rows, cols = pixel_cells(h), pixel_cells(w)
    ys, xs = cell_edges(h), cell_edges(w)
    arr = np.asarray(view.convert("RGB"), np.float32)
    if pool:
        boxes = [(r, c, min(r + pool, h), min(c + pool, w)) for r in range(0, h, pool) for c in range(0, w, pool)]
    else:
        mask = np.zeros(h * w, bool)
        mask[np.asarray(kept, int)] = True
        px = mask.reshape(h, w)[rows[:, None], cols[None, :]]
        arr = np.where(px[..., None], arr, dim(arr))
        boxes = [(r, c, r + 1, c + 1) for r, c in (divmod(int(i), w) for i in np.flatnonzero(mask))]
    panel = Image.new("RGB", (PANEL, PANEL_HEADER_H + PANEL), BACKGROUND)
    panel.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), (0, PANEL_HEADER_H))
    draw = ImageDraw.Draw(panel)
    top = PANEL_HEADER_H
    for r0, c0, r1, c1 in boxes:  # the same edges as the fills
        draw.rectangle([xs[c0], top + ys[r0], xs[c1] - 1, top + ys[r1] - 1], outline=BOX)
    font = _font()
    draw.text((2, 1), _fit(draw, title, PANEL - 4, font), fill=INK, font=font)
    if note:
        draw.text((2, 1 + LINE_H), _fit(draw, note, PANEL - 4, font), fill=NOTE_INK, font=font)
    return panel


@dataclass
class Row:
    title: str  # the bundle
    panels: list[Image.Image]


def _sheet_width(rows: list[Row]) -> int:
    cols = max(1, max(len(r.panels) for r in rows))
    return max(PAD + cols * (PANEL + PAD), 2 * (PANEL + PAD) + PAD)  # wide enough for the legend


def image_origin(row: int, col: int, title_h: int = SHEET_TITLE_H) -> tuple[int, int]:
    """Top-left pixel of the model view of panel (row, col) in the sheet ``compose`` draws (``title_h``: its
    title block's height, taller than the default when the prompt wraps)."""
    x = PAD + col * (PANEL + PAD)
    y = title_h + row * (ROW_TITLE_H + PANEL_HEADER_H + PANEL + PAD) + ROW_TITLE_H + PANEL_HEADER_H
    return x, y


def wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font, max_lines: int = 12) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, broken at spaces (inside a word only when one word is wider);
    past ``max_lines`` the last line ends in an ellipsis. The whole prompt shows: text-guided methods select by it."""
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width:  # a word wider than the line: break it
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [_fit(draw, " ".join(lines[max_lines - 1:]), width, font)]
    return lines


def title_block(title_lines: list[str], width: int) -> list[str]:
    """The sheet's title lines as drawn: the image line fitted, the prompt wrapped."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    out = [_fit(draw, title_lines[0], width - 2 * PAD, font)] if title_lines else []
    for line in title_lines[1:2]:
        out += wrap(draw, line, width - 2 * PAD, font)
    return out


def title_height(lines: list[str]) -> int:
    return max(SHEET_TITLE_H, len(lines) * LINE_H + 6)


def compose(rows: list[Row], title_lines: list[str], pooled: bool = False) -> Image.Image:
    """The sheet: ``title_lines`` (image, prompt) on top, one titled row per bundle, a legend at the bottom."""
    width = _sheet_width(rows)
    row_h = ROW_TITLE_H + PANEL_HEADER_H + PANEL + PAD
    lines = title_block(title_lines, width)
    title_h = title_height(lines)
    height = title_h + len(rows) * row_h + LEGEND_H
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, bold = _font(), _font(FONT_SIZE + 1)
    for i, line in enumerate(lines):
        draw.text((PAD, 3 + i * LINE_H), line, fill=INK, font=font)
    for r, row in enumerate(rows):
        y = title_h + r * row_h
        draw.text((PAD, y + 2), _fit(draw, row.title, width - 2 * PAD, bold), fill=INK, font=bold)
        for c, panel in enumerate(row.panels):
            x, _ = image_origin(r, c, title_h)
            sheet.paste(panel, (x, y + ROW_TITLE_H))
    _legend(draw, title_h + len(rows) * row_h, width, font, pooled)
    return sheet


def _legend(draw: ImageDraw.ImageDraw, y: int, width: int, font, pooled: bool) -> None:
    s = LINE_H - 4
    grey = np.array([170, 170, 170])
    x = PAD
    draw.rectangle([x, y + 2, x + s, y + 2 + s], fill=tuple(grey), outline=BOX)
    text = "kept: one visual token (boxed, original brightness)"
    draw.text((x + s + 6, y + 1), text, fill=INK, font=font)
    x += s + 6 + int(draw.textlength(text, font=font)) + 18
    draw.rectangle([x, y + 2, x + s, y + 2 + s], fill=tuple(dim(grey).astype(int)))
    draw.text((x + s + 6, y + 1), "dropped (dimmed)", fill=INK, font=font)
    if pooled:
        line = "pool: nothing is dropped; each box is a 2x2 window of patches averaged into one token"
        draw.text((PAD, y + 1 + LINE_H), _fit(draw, line, width - 2 * PAD, font), fill=INK, font=font)
