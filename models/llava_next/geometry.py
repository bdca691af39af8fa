"""LLaVA-NeXT "anyres" geometry and preprocessing with numpy + Pillow (torch-free).

An image becomes a base view (the whole image resized to the view size, aspect ratio not kept) plus the crops of
the image resized to fit the best of ``image_grid_pinpoints`` (aspect ratio kept), zero-padded to it and cut into
view-size tiles, row-major. After the projector the crops form one raster, unpadded to the image's aspect ratio.

Written by hand (the formulas are a few lines each) rather than imported because the runtime may not import
transformers; each function names the transformers function it reproduces, and ``tests/test_anyres.py`` checks
the whole against ``LlavaNextImageProcessor`` and ``LlavaNextForConditionalGeneration``'s own unpadding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmprune.errors import VlmpruneError

from vlmprune.runtime.preprocess import FILTERS, center_crop, shortest_edge_size, to_rgb


def select_best_resolution(size_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """``transformers.image_processing_utils.select_best_resolution``: the pinpoint (h, w) keeping the most of the
    image's resolution, then wasting the least."""
    h, w = size_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    return best


def fit_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """``get_patch_output_size``: the image resized into ``target`` with its aspect ratio kept (h, w)."""
    h, w = size_hw
    th, tw = target_hw
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def unpadded_span(size_hw: tuple[int, int], raster_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """``modeling_llava_next.unpad_image`` on a feature raster: (top, bottom, left, right) of the rows and columns
    kept for an image of ``size_hw`` (same float arithmetic, so the same integers)."""
    h, w = size_hw
    ch, cw = raster_hw
    if w / h > cw / ch:
        new_h = int(round(h * (cw / w), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(w * (ch / h), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


@dataclass(frozen=True)
class Layout:
    """A pinpoint's crop grid: ``rows x cols`` views of ``view`` pixels, each ``side x side`` tokens."""

    rows: int
    cols: int
    view: int  # view size in pixels (336)
    side: int  # tokens per view side (24)

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def pinpoint(self) -> tuple[int, int]:
        return self.rows * self.view, self.cols * self.view

    @property
    def num_views(self) -> int:
        return 1 + self.rows * self.cols

    @property
    def raster(self) -> tuple[int, int]:
        return self.rows * self.side, self.cols * self.side

    def valid_mask(self, size_hw: tuple[int, int]) -> np.ndarray:
        """[rows*side, cols*side] bool: the raster positions kept by the unpadding for an image of ``size_hw``."""
        top, bottom, left, right = unpadded_span(size_hw, self.raster)
        mask = np.zeros(self.raster, bool)
        mask[top:bottom, left:right] = True
        return mask

    def num_tokens(self, size_hw: tuple[int, int], base_tokens: int) -> int:
        """Image tokens transformers gives this image unpruned: the base view, the unpadded raster, one newline per
        unpadded row."""
        top, bottom, left, right = unpadded_span(size_hw, self.raster)
        return base_tokens + (bottom - top) * (right - left) + (bottom - top)


def layouts_for(pinpoints, view: int, side: int) -> list[Layout]:
    out = []
    for ph, pw in pinpoints:
        if ph % view or pw % view:
            raise VlmpruneError(f"image_grid_pinpoints entry {[ph, pw]} is not a multiple of the {view} px view",
                                "use a checkpoint whose pinpoints are whole numbers of views")
        lay = Layout(ph // view, pw // view, view, side)
        if lay not in out:
            out.append(lay)
    return out


def layout_for_image(size_hw: tuple[int, int], pinpoints, view: int, side: int) -> Layout:
    ph, pw = select_best_resolution(size_hw, pinpoints)
    return Layout(ph // view, pw // view, view, side)


MAX_CROPS = 64  # crops of one canvas (LLaVA-NeXT's largest is 2x2, OneVision's 6x6): bounds views and memory
MAX_PINPOINTS = 256


def check_anyres_constants(constants: dict, view: int) -> None:
    """The manifest's anyres fields (``preprocessing.grid_pinpoints``), which the generic schema leaves to the
    family: a list of [height, width] canvases, whole numbers of views, each at most ``MAX_CROPS`` crops, so a
    crafted canvas cannot make the runtime allocate thousands of views. One line per problem (the manifest is
    untrusted input). Called by ``AnyresPreprocessor`` when a bundle's pipeline opens."""
    pins = constants.get("grid_pinpoints")
    where = "the manifest's preprocessing.grid_pinpoints"
    if not isinstance(pins, list) or not 1 <= len(pins) <= MAX_PINPOINTS:
        raise VlmpruneError(f"{where} must be a list of 1..{MAX_PINPOINTS} [height, width] pairs, got "
                            f"{str(pins)[:60]}", "re-export the bundle")
    if type(view) is not int or view < 1:
        raise VlmpruneError(f"the manifest's preprocessing.crop_size gives a view of {view!r}", "re-export the bundle")
    for pin in pins:
        if (not isinstance(pin, list) or len(pin) != 2 or any(type(x) is not int or x < 1 for x in pin)):
            raise VlmpruneError(f"{where} entry {str(pin)[:40]} is not a [height, width] pair of positive integers",
                                "re-export the bundle")
        if pin[0] % view or pin[1] % view:
            raise VlmpruneError(f"{where} entry {pin} is not a multiple of the {view} px view", "re-export the bundle")
        crops = (pin[0] // view) * (pin[1] // view)
        if crops > MAX_CROPS:
            raise VlmpruneError(f"{where} entry {pin} makes {crops} crops of {view} px, over the {MAX_CROPS} allowed",
                                "re-export the bundle")


_PART_KINDS = {"base": ("base_embeds", "base_indices"), "raster": ("raster_embeds", "raster_indices")}


def check_anyres_buckets(manifest: dict) -> None:
    """The anyres bucket fields that the graphs also state, cross-checked when the pipeline opens: each part's
    outputs (``base_*``, ``raster_*``) hold that part's recorded K, and the graph takes ``num_views`` views. So base
    and raster kinds swapped in a crafted manifest are one line, not a wrong stitch (``check_io`` then holds the
    recorded shapes to the graph's). Called by ``AnyresPipeline`` when it opens a bundle."""
    for b in manifest["vision"]["buckets"]:
        parts = b.get("parts")
        if not isinstance(parts, list):
            raise VlmpruneError(f"the manifest's anyres bucket {b['name']} lists no parts", "re-export the bundle")
        for part in parts:
            kinds = _PART_KINDS.get(part.get("name")) if isinstance(part, dict) else None
            if kinds is None or type(part.get("k")) is not int:
                raise VlmpruneError(f"the manifest's bucket {b['name']} has a part {str(part)[:60]} that is not a base "
                                    "or raster part with an integer k", "re-export the bundle")
            for e in b["outputs"]:
                if e["kind"] in kinds and len(e["shape"]) >= 2 and type(e["shape"][1]) is int \
                        and e["shape"][1] != part["k"]:
                    raise VlmpruneError(f"the manifest's bucket {b['name']} output {e['name']!r} ({e['kind']}) holds "
                                        f"{e['shape'][1]} tokens, but its {part['name']} part keeps {part['k']}",
                                        "re-export the bundle")
        views = b.get("num_views", 1)
        pixels = next((e["shape"] for e in b["inputs"] if e["kind"] == "pixel_values"), None)
        if pixels and type(pixels[0]) is int and pixels[0] != views:
            raise VlmpruneError(f"the manifest's bucket {b['name']} takes {pixels[0]} views, but records {views}",
                                "re-export the bundle")


class AnyresPreprocessor:
    """``image -> (pixel_values [1 + rows*cols, 3, S, S] float32, (h, w), Layout)`` from the manifest's
    ``preprocessing`` block (kind ``anyres``): ``LlavaNextImageProcessor`` step for step."""

    def __init__(self, constants: dict, side: int):
        self.c = constants
        if constants["resample"] not in FILTERS:
            raise VlmpruneError(f"unknown resample filter {constants['resample']!r} in the manifest", "re-export")
        check_anyres_constants(constants, constants["crop_size"][0])
        self.pinpoints = [tuple(int(x) for x in p) for p in constants["grid_pinpoints"]]
        if not self.pinpoints:
            raise VlmpruneError("the manifest's anyres preprocessing lists no grid_pinpoints", "re-export")
        self.view = int(constants["crop_size"][0])
        self.side = side
        self.filter = FILTERS[constants["resample"]]
        self.mean = np.asarray(constants["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(constants["std"], np.float32).reshape(3, 1, 1)

    def layout(self, size_hw: tuple[int, int]) -> Layout:
        return layout_for_image(size_hw, self.pinpoints, self.view, self.side)

    def _finish(self, tile: Image.Image) -> np.ndarray:
        """The per-view steps after tiling: shortest-edge resize, center crop, rescale, normalise."""
        c = self.c
        if c["do_resize"]:
            size = shortest_edge_size(tile.size, c["resize_shortest_edge"])
            if size != tile.size:
                tile = tile.resize(size, self.filter)
        arr = np.asarray(tile)
        if c["do_center_crop"]:
            arr = center_crop(arr, *c["crop_size"])
        x = arr.transpose(2, 0, 1)
        if c["do_rescale"]:
            x = (x.astype(np.float64) * c["rescale_factor"]).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if c["do_normalize"]:
            x = (x - self.mean) / self.std
        return x

    def __call__(self, image: Image.Image, layout: Layout | None = None) -> tuple[np.ndarray, tuple[int, int], Layout]:
        """``layout``: tile onto this layout's pinpoint instead of the image's best one (INT8 calibration feeds every
        layout's graph with every image)."""
        if self.c.get("do_convert_rgb", True) or image.mode != "RGB":
            image = to_rgb(image)
        w, h = image.size
        layout = layout or self.layout((h, w))
        th, tw = layout.pinpoint
        nh, nw = fit_size((h, w), (th, tw))
        resized = image.resize((nw, nh), self.filter) if (nw, nh) != (w, h) else image
        canvas = Image.new("RGB", (tw, th), (0, 0, 0))  # zero padding, centred with the odd pixel after
        canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
        s = self.view
        base = image.resize((s, s), self.filter) if (w, h) != (s, s) else image
        tiles = [base] + [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
                          for r in range(layout.rows) for c in range(layout.cols)]
        pixels = np.stack([self._finish(t) for t in tiles])
        return np.ascontiguousarray(pixels, dtype=np.float32), (h, w), layout


def parse_layouts(text: str) -> list[str]:
    """``--layouts``: pinpoint layouts as ``RxC``, comma-separated."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names:
        raise VlmpruneError(f"--layouts {text!r} names no layout", "give e.g. --layouts 2x2,1x2, or leave it out for all")
    return names
