"""A made visual-question dataset with true answers, in LLaVA's evaluation JSONL layout: drawn scenes (a house and
a car of chosen colours, some trees, a sun or not) and questions whose answers follow from the drawing. It needs
no download, so tests and the README's example run anywhere; a real checkpoint can be scored on it too.

    python -m vlmprune.runtime.eval_demo evaldata --items 50
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (200, 40, 35), "blue": (35, 70, 200), "green": (40, 150, 60), "yellow": (235, 200, 40),
          "white": (240, 240, 240), "black": (25, 25, 25)}
SIZES = [(480, 360), (640, 480), (400, 400), (360, 480), (800, 450)]
SHORT = "Answer the question using a single word or phrase."  # LLaVA's VQAv2 instruction


def draw_scene(width: int, height: int, house: str, car: str, trees: int, sun: bool) -> Image.Image:
    img = Image.new("RGB", (width, height), (120, 180, 235))
    d = ImageDraw.Draw(img)
    horizon = int(height * 0.62)
    grass = (150, 120, 80) if "green" in (car, house) else (70, 140, 60)  # a green car stands on brown ground
    d.rectangle([0, horizon, width, height], fill=grass)
    if sun:
        s = min(width, height) * 0.16
        d.ellipse([width * 0.78, height * 0.06, width * 0.78 + s, height * 0.06 + s], fill=(250, 215, 40))
    hx, hy, hw, hh = width * 0.08, height * 0.3, width * 0.28, height * 0.36
    d.rectangle([hx, hy, hx + hw, hy + hh], fill=COLORS[house])
    d.polygon([(hx - 8, hy), (hx + hw / 2, hy - hh * 0.5), (hx + hw + 8, hy)], fill=(110, 60, 40))
    d.rectangle([hx + hw * 0.4, hy + hh * 0.5, hx + hw * 0.6, hy + hh], fill=(80, 50, 30))
    for t in range(trees):
        tx = width * (0.42 + 0.12 * t)
        d.rectangle([tx + 8, horizon - 40, tx + 16, horizon + 5], fill=(90, 60, 30))
        d.ellipse([tx - 6, horizon - 85, tx + 30, horizon - 35], fill=(30, 110, 40))
    cx, cy = width * 0.55, height * 0.75
    d.rectangle([cx, cy, cx + width * 0.3, cy + height * 0.09], fill=COLORS[car])
    d.rectangle([cx + width * 0.06, cy - height * 0.07, cx + width * 0.22, cy], fill=COLORS[car])
    for wx in (cx + width * 0.04, cx + width * 0.22):
        r = min(width, height) * 0.07
        d.ellipse([wx, cy + height * 0.06, wx + r, cy + height * 0.06 + r], fill=(15, 15, 15))
    return img


def make_demo_dataset(folder: str | Path, items: int = 50, seed: int = 0) -> Path:
    """Write ``items`` pictures and ``questions.jsonl`` (LLaVA layout, one ``answer`` each) into ``folder``;
    returns the JSONL path. Deterministic for a seed."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    lines = []
    for i in range(items):
        house, car = rng.choice(names), rng.choice(names)
        trees, sun = rng.randint(0, 3), rng.random() < 0.5
        w, h = SIZES[i % len(SIZES)]
        image = f"images/scene_{i:04d}.png"
        draw_scene(w, h, house, car, trees, sun).save(folder / image)
        question, answer = [
            ("What color is the car?", car),
            ("What color is the house?", house),
            ("How many trees are there?", str(trees)),
            ("Is there a sun in the sky?", "yes" if sun else "no"),
        ][i % 4]
        lines.append({"question_id": i, "image": image, "text": f"{question}\n{SHORT}", "answer": answer})
    out = folder / "questions.jsonl"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vlmprune.runtime.eval_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(make_demo_dataset(args.folder, args.items, args.seed))


if __name__ == "__main__":
    main()
