"""``prune-viz`` pictures read back pixel by pixel: the bright cells and the boxes sit exactly on the kept indices,
``pool`` is drawn as pooling, and a bundle or keep ratio that cannot be drawn as asked says so."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preset_geometry import PRESET_GRIDS, grid_id, preset_tokens, spec_k
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.runtime import viz
from vlmprune.runtime.cli import viz_main
from vlmprune.runtime.pipeline import Pipeline
from vlmprune.sample import make_sample_image

YELLOW = np.array(viz.BOX)
BUNDLE_TOKENS = preset_tokens(ExportRequest.model)  # (N, grid) of the bundles' preset (prune-export's default)


def _dim(a):
    return (a.astype(np.float32) * 0.25 + 20).astype(np.uint8)


def _view():
    return make_sample_image(viz.PANEL, viz.PANEL)


def _divides_the_panel(grid):
    return viz.PANEL % grid[0] == 0 and viz.PANEL % grid[1] == 0


# the registered presets' token grids: those that divide the panel into whole-pixel cells, and the others
EVEN_GRIDS = [g for g in PRESET_GRIDS if _divides_the_panel(g)]
UNEVEN_GRIDS = [g for g in PRESET_GRIDS if not _divides_the_panel(g)]


@pytest.mark.parametrize("grid", EVEN_GRIDS, ids=grid_id)
def test_cells_and_boxes_match_the_kept_indices_exactly_on_the_preset_grids(grid):
    """Independent geometry: a grid that divides the panel has cells of PANEL / side pixels. Every pixel of a kept
    patch is either its box (on the patch's border) or the original pixel; every pixel of a dropped patch is
    dimmed."""
    h, w = grid
    ch, cw = viz.PANEL // h, viz.PANEL // w
    rng = np.random.default_rng(0)
    kept = sorted(rng.choice(h * w, h * w // 4, replace=False).tolist())
    view = _view()
    panel = np.asarray(viz.overlay(view, kept, grid, "t"))[viz.PANEL_HEADER_H:]
    src = np.asarray(view)
    for i in range(h * w):
        r, c = divmod(i, w)
        got = panel[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw].astype(int)
        ref = src[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
        if i in kept:
            border = np.ones((ch, cw), bool)
            border[1:-1, 1:-1] = False
            assert (got[border] == YELLOW).all(), f"patch {i}: box missing"
            assert (got[1:-1, 1:-1] == ref[1:-1, 1:-1]).all(), f"patch {i}: kept patch not bright"
        else:
            assert (got == _dim(ref)).all(), f"patch {i}: dropped patch not dimmed (or a box drawn on it)"


@pytest.mark.parametrize("grid", [(7, 5), (23, 25), *UNEVEN_GRIDS], ids=grid_id)
def test_fills_and_boxes_share_one_geometry_on_grids_that_do_not_divide_the_panel(grid):
    h, w = grid
    kept = list(range(0, h * w, 3))
    view = _view()
    panel = np.asarray(viz.overlay(view, kept, grid, "t"))[viz.PANEL_HEADER_H:].astype(int)
    src = np.asarray(view)
    ys, xs = viz.cell_edges(h), viz.cell_edges(w)
    assert ys[0] == 0 and ys[-1] == viz.PANEL and xs[-1] == viz.PANEL
    for i in range(h * w):
        r, c = divmod(i, w)
        got = panel[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        ref = src[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        if i in kept:
            border = np.ones(got.shape[:2], bool)
            border[1:-1, 1:-1] = False
            assert (got[border] == YELLOW).all() and (got[1:-1, 1:-1] == ref[1:-1, 1:-1]).all(), i
        else:
            assert (got == _dim(ref)).all(), i


@pytest.mark.parametrize("grid", [g for g in EVEN_GRIDS if g[0] % 2 == 0 and g[1] % 2 == 0], ids=grid_id)
def test_pool_is_drawn_as_pooling_nothing_dimmed_one_box_per_window(grid):
    view = _view()
    panel = np.asarray(viz.overlay(view, [], grid, "pool", pool=2))[viz.PANEL_HEADER_H:].astype(int)
    src = np.asarray(view).astype(int)
    lines = np.zeros((viz.PANEL, viz.PANEL), bool)
    box_h, box_w = 2 * viz.PANEL // grid[0], 2 * viz.PANEL // grid[1]  # each 2x2 window of patches is one box
    for e in range(0, viz.PANEL, box_h):
        lines[e, :] = lines[e + box_h - 1, :] = True
    for e in range(0, viz.PANEL, box_w):
        lines[:, e] = lines[:, e + box_w - 1] = True
    assert (panel[lines] == YELLOW).all()
    assert (panel[~lines] == src[~lines]).all()  # every patch at full brightness: pool drops none


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    out = {}
    for method, keeps in (("fopru", [0.25]), ("pool", [0.25]), ("none", [1.0])):
        out[method] = export_bundle(ExportRequest(method=method, keeps=keeps, out=root / method, validate=False),
                                    Steps(quiet=True)).path
    return out


def test_prune_viz_picture_read_back_per_patch_equals_the_kept_indices(bundles, tmp_path):
    out = tmp_path / "viz.png"
    assert viz_main.run([str(bundles["fopru"]), "--image", "sample", "--keep", "0.25", "-o", str(out)]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    pipe = Pipeline(bundles["fopru"])
    image = make_sample_image()
    bucket, _ = pipe.choose_bucket(0.25)
    kept = set(pipe.request(image, "Describe the image.", bucket=bucket).stitched.kept.tolist())
    view = np.asarray(viz.model_view(image, pipe.preprocess))
    x0, y0 = viz.image_origin(0, 0)
    cells = sheet[y0:y0 + viz.PANEL, x0:x0 + viz.PANEL]
    n, (h, w) = BUNDLE_TOKENS
    ch, cw = viz.PANEL // h, viz.PANEL // w
    bright = set()
    for i in range(n):
        r, c = divmod(i, w)
        y, x = r * ch + ch // 2, c * cw + cw // 2
        if (cells[y, x] == view[y, x]).all() and (cells[r * ch, c * cw] == YELLOW).all():
            bright.add(i)
        else:
            assert (cells[y, x] == _dim(view[y, x])).all(), f"patch {i} is neither kept-looking nor dimmed"
    assert bright == kept and len(kept) == spec_k(0.25, n)


def test_pool_bundle_has_no_dimmed_patch(bundles, tmp_path):
    out = tmp_path / "pool.png"
    assert viz_main.run([str(bundles["pool"]), "--image", "sample", "-o", str(out)]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    pipe = Pipeline(bundles["pool"])
    view = np.asarray(viz.model_view(make_sample_image(), pipe.preprocess)).astype(int)
    x0, y0 = viz.image_origin(0, 0)
    cells = sheet[y0:y0 + viz.PANEL, x0:x0 + viz.PANEL]
    _, (h, w) = BUNDLE_TOKENS
    ch, cw = viz.PANEL // h, viz.PANEL // w
    centres = (slice(ch // 2, viz.PANEL, ch), slice(cw // 2, viz.PANEL, cw))
    assert (cells[centres] == view[centres]).all()


def test_none_only_bundle_is_one_line_and_keep_without_bucket_is_announced(bundles, tmp_path, capsys):
    out = tmp_path / "none.png"
    assert viz_main.run([str(bundles["none"]), "--image", "sample", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only the unpruned `none` bucket" in err and "--keep 1.0" in err
    assert not out.exists()
    assert viz_main.run([str(bundles["none"]), "--image", "sample", "--keep", "1.0", "-o", str(out)]) == 0
    assert viz_main.run([str(bundles["fopru"]), "--image", "sample", "--keep", "0.2", "-o", str(out)]) == 0
    k = spec_k(0.25, BUNDLE_TOKENS[0])
    assert f"no bucket for keep 0.2; using the next larger, fopru-k{k}" in capsys.readouterr().err


def test_a_long_prompt_wraps_whole_inside_the_sheet():
    """GridPrune selects by the prompt, so the sheet shows all of it: wrapped, every line inside the width."""
    from PIL import ImageDraw

    prompt = 'prompt: "' + " ".join(f"word{i}" for i in range(120)) + ' supercalifragilistic' * 3 + '"'
    width = 2 * (viz.PANEL + viz.PAD) + viz.PAD
    lines = viz.title_block(["image: sample", prompt], width)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert " ".join(lines[1:]) == prompt and len(lines) > 3
    assert all(draw.textlength(line, font=viz._font()) <= width - 2 * viz.PAD for line in lines)
    sheet = viz.compose([viz.Row("bundle b: view", [Image.new("RGB", (viz.PANEL, viz.PANEL_HEADER_H + viz.PANEL))])],
                        ["image: sample", prompt])
    title_h = viz.title_height(lines)
    assert title_h > viz.SHEET_TITLE_H and sheet.height == title_h + viz.ROW_TITLE_H + viz.PANEL_HEADER_H + viz.PANEL \
        + viz.PAD + viz.LEGEND_H
    assert viz.image_origin(0, 0, title_h)[1] == title_h + viz.ROW_TITLE_H + viz.PANEL_HEADER_H


def test_row_title_says_crop_or_whole_image_from_the_preprocessing():
    """The header claimed "its crop" for every family; Qwen2.5-VL's view is the whole image (crop box = image)."""

    class Whole:
        def crop_box(self, size):
            return 0.0, 0.0, float(size[0]), float(size[1])

    class Crop:
        def crop_box(self, size):
            return 100.0, 0.0, 500.0, 400.0

    image = Image.new("RGB", (600, 400))
    assert viz.view_words(image, Whole()) == "the whole image, resized to the model's view"
    assert viz.view_words(image, Crop()) == "the center crop the model sees, resized"
