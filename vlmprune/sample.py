"""A deterministic test picture made with Pillow, so that demos and validation need no download."""

from __future__ import annotations

from PIL import Image, ImageDraw


def make_sample_image(width: int = 480, height: int = 360) -> Image.Image:
    """Sky, grass, a red house with a door and window, a yellow sun and a blue car: simple, recognisable regions."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # sky gradient over grass
        if y < height * 0.62:
            t = y / (height * 0.62)
            draw.line([(0, y), (width, y)], fill=(int(90 + 80 * t), int(150 + 60 * t), 235))
        else:
            draw.line([(0, y), (width, y)], fill=(60, 150 - (y % 7) * 3, 60))
    s = min(width, height)
    draw.ellipse([width * 0.75, height * 0.06, width * 0.75 + s * 0.18, height * 0.06 + s * 0.18], fill=(250, 215, 40))
    hx, hy, hw, hh = width * 0.12, height * 0.32, width * 0.3, height * 0.36
    draw.rectangle([hx, hy, hx + hw, hy + hh], fill=(190, 45, 40))
    draw.polygon([(hx - 10, hy), (hx + hw / 2, hy - hh * 0.55), (hx + hw + 10, hy)], fill=(110, 60, 40))
    draw.rectangle([hx + hw * 0.4, hy + hh * 0.5, hx + hw * 0.6, hy + hh], fill=(80, 50, 30))
    draw.rectangle([hx + hw * 0.1, hy + hh * 0.2, hx + hw * 0.3, hy + hh * 0.4], fill=(200, 230, 250))
    cx, cy = width * 0.55, height * 0.7
    draw.rectangle([cx, cy, cx + width * 0.3, cy + height * 0.1], fill=(30, 70, 200))
    draw.rectangle([cx + width * 0.06, cy - height * 0.07, cx + width * 0.22, cy], fill=(40, 90, 220))
    for wx in (cx + width * 0.05, cx + width * 0.22):
        draw.ellipse([wx, cy + height * 0.07, wx + s * 0.08, cy + height * 0.07 + s * 0.08], fill=(20, 20, 20))
    return img
