"""``prune-viz`` pictures read back pixel by pixel: the bright cells and the boxes sit exactly on the kept indices,
``pool`` is drawn as pooling, and a bundle or keep ratio that cannot be drawn as asked says so."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.runtime import viz
from vlmprune.runtime.cli import viz_main
from vlmprune.runtime.pipeline import Pipeline
from vlmprune.sample import make_sample_image

YELLOW = np.array(viz.BOX)


def _dim(a):
    return (a.astype(np.float32) * 0.25 + 20).astype(np.uint8)


def _view():
    return make_sample_image(viz.PANEL, viz.PANEL)


def test_cells_and_boxes_match_the_kept_indices_exactly_on_24x24():
    """Independent geometry: 336 px / 24 = 14 px per patch. Every pixel of a kept patch is either its box (on the
    patch's border) or the original pixel; every pixel of a dropped patch is dimmed."""
    rng = np.random.default_rng(0)
    kept = sorted(rng.choice(576, 144, replace=False).tolist())
    view = _view()
    panel = np.asarray(viz.overlay(view, kept, (24, 24), "t"))[viz.PANEL_HEADER_H:]
    src = np.asarray(view)
    for i in range(576):
        r, c = divmod(i, 24)
        got = panel[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].astype(int)
        ref = src[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
        if i in kept:
            border = np.ones((14, 14), bool)
            border[1:-1, 1:-1] = False
            assert (got[border] == YELLOW).all(), f"patch {i}: box missing"
            assert (got[1:-1, 1:-1] == ref[1:-1, 1:-1]).all(), f"patch {i}: kept patch not bright"
        else:
            assert (got == _dim(ref)).all(), f"patch {i}: dropped patch not dimmed (or a box drawn on it)"


@pytest.mark.parametrize("grid", [(7, 5), (23, 25)])
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


def test_pool_is_drawn_as_pooling_nothing_dimmed_one_box_per_window():
    view = _view()
    panel = np.asarray(viz.overlay(view, [], (24, 24), "pool", pool=2))[viz.PANEL_HEADER_H:].astype(int)
    src = np.asarray(view).astype(int)
    lines = np.zeros((336, 336), bool)
    for e in range(0, 336, 28):  # each 2x2 window of 14 px patches is one 28 px box
        lines[e, :] = lines[e + 27, :] = lines[:, e] = lines[:, e + 27] = True
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
    _, kept, _ = pipe.vision(pipe.preprocess(image), bucket, "Describe the image.")
    kept = set(kept[0].tolist())
    view = np.asarray(viz.model_view(image, pipe.preprocess))
    x0, y0 = viz.image_origin(0, 0)
    cells = sheet[y0:y0 + 336, x0:x0 + 336]
    bright = set()
    for i in range(576):
        r, c = divmod(i, 24)
        y, x = r * 14 + 7, c * 14 + 7
        if (cells[y, x] == view[y, x]).all() and (cells[r * 14, c * 14] == YELLOW).all():
            bright.add(i)
        else:
            assert (cells[y, x] == _dim(view[y, x])).all(), f"patch {i} is neither kept-looking nor dimmed"
    assert bright == kept and len(kept) == 144


def test_pool_bundle_has_no_dimmed_patch(bundles, tmp_path):
    out = tmp_path / "pool.png"
    assert viz_main.run([str(bundles["pool"]), "--image", "sample", "-o", str(out)]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    pipe = Pipeline(bundles["pool"])
    view = np.asarray(viz.model_view(make_sample_image(), pipe.preprocess)).astype(int)
    x0, y0 = viz.image_origin(0, 0)
    cells = sheet[y0:y0 + 336, x0:x0 + 336]
    centres = (slice(7, 336, 14), slice(7, 336, 14))
    assert (cells[centres] == view[centres]).all()


def test_none_only_bundle_is_one_line_and_keep_without_bucket_is_announced(bundles, tmp_path, capsys):
    out = tmp_path / "none.png"
    assert viz_main.run([str(bundles["none"]), "--image", "sample", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only the unpruned `none` bucket" in err and "--keep 1.0" in err
    assert not out.exists()
    assert viz_main.run([str(bundles["none"]), "--image", "sample", "--keep", "1.0", "-o", str(out)]) == 0
    assert viz_main.run([str(bundles["fopru"]), "--image", "sample", "--keep", "0.2", "-o", str(out)]) == 0
    assert "no bucket for keep 0.2; using the next larger, fopru-k144" in capsys.readouterr().err
