"""LLaVA-NeXT end to end on tiny-llava-next: export per pinpoint layout, the torch-free anyres runtime, and parity
with transformers (generate unpruned for every layout; pruned, a greedy loop fed the same kept features and
positions; kept indices of the ONNX graphs identical to the PyTorch module's in fp32)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from preset_geometry import spec_k
from vlmprune.errors import VlmpruneError
from vlmprune.models.llava_next.export import validation_size
from vlmprune.models.llava_next.graphs import OUTPUTS, AnyresVisionGraph
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.models import load_model
from vlmprune.runtime import viz
from vlmprune.models.llava_next.runtime import LlavaNextRuntime
from vlmprune.runtime.pipeline import Pipeline, open_bundle
from vlmprune.sample import make_sample_image

PROMPT = "What is next to the red house?"
TOKENS = 32


@pytest.fixture(scope="module")
def nxt():
    torch.set_grad_enabled(False)
    return load_model("tiny-llava-next")


@pytest.fixture(scope="module")
def gprune_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("next") / "gprune"
    return export_bundle(ExportRequest(model="tiny-llava-next", method="gprune", keeps=[0.25], out=out),
                         Steps(quiet=True)).path


@pytest.fixture(scope="module")
def fopru_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("next") / "fopru"
    return export_bundle(ExportRequest(model="tiny-llava-next", method="fopru", keeps=[0.25], family_options={"layouts": ["2x2", "1x3"]},
                                       out=out), Steps(quiet=True)).path


@pytest.fixture(scope="module")
def gridprune_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("next") / "gridprune"
    return export_bundle(ExportRequest(model="tiny-llava-next", method="gridprune", keeps=[0.25], family_options={"layouts": ["2x1"]},
                                       out=out), Steps(quiet=True)).path


def _image_for(nxt, name):
    lay = nxt.layout(name)
    h, w = validation_size(lay, nxt.preprocessing.grid_pinpoints)
    return make_sample_image(w, h)


def _transformers_inputs(nxt, image, rendered):
    inputs = nxt.processor(images=image, text=rendered, return_tensors="pt")
    feats = nxt.model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    return inputs, torch.cat(list(feats.pooler_output))


def _greedy(nxt, embeds, positions, steps=TOKENS + 8):
    """A plain greedy loop over the transformers model fed ``inputs_embeds`` and explicit position ids."""
    from transformers import DynamicCache

    cache = DynamicCache(config=nxt.model.config.text_config)
    x, pos, nxt_pos, tokens = embeds, positions[None], int(positions[-1]) + 1, []
    for _ in range(steps):
        out = nxt.model(inputs_embeds=x, position_ids=pos, past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        cache = out.past_key_values
        x = nxt.embedding_table()[[token]][None]
        pos = torch.tensor([[nxt_pos]])
        nxt_pos += 1
    eos = nxt.text.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# --- manifest ---------------------------------------------------------------------------------------------------------


def test_manifest_records_views_layouts_and_parts(nxt, gprune_bundle):
    pipe = open_bundle(gprune_bundle)
    assert isinstance(pipe.family, LlavaNextRuntime)
    m = pipe.manifest
    assert [v["name"] for v in m["vision"]["views"]] == ["base", "crop"]
    assert [lay["name"] for lay in m["vision"]["layouts"]] == [lay.name for lay in nxt.layouts]
    assert pipe.family.layouts() == sorted(lay.name for lay in nxt.layouts)  # every layout has graphs by default
    assert m["prompt"]["stitch"] == "anyres_raster" and m["prompt"]["positions"] == "original"  # G-Prune's default
    assert m["preprocessing"]["kind"] == "anyres"
    g = next(b for b in m["vision"]["buckets"] if b["name"].startswith("gprune-2x2"))
    n = nxt.vision.views[0].num_patches
    # 0.25 of the base view's patches, 0.25 of the 2x2 raster's: static sizes, whatever the padding of an image
    assert g["num_views"] == 5 and [p["k"] for p in g["parts"]] == [spec_k(0.25, n), spec_k(0.25, 2 * 2 * n)]
    assert {i["name"] for i in g["inputs"]} == {"pixel_values", "valid_mask"}
    assert [o["name"] for o in g["outputs"]] == OUTPUTS
    assert m["model"]["family"]["model_type"] == "llava_next"


def test_a_missing_layout_is_one_line(tmp_path, fopru_bundle):
    pipe = Pipeline(fopru_bundle)
    with pytest.raises(VlmpruneError, match="needs layout 1x2.*only for 1x3, 2x2"):
        pipe.generate(make_sample_image(800, 400), PROMPT, max_new_tokens=2)


# --- parity ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["1x2", "2x1", "2x2", "3x1", "1x3"])
def test_unpruned_greedy_output_equals_transformers_generate(nxt, gprune_bundle, layout):
    pipe = Pipeline(gprune_bundle)
    image = _image_for(nxt, layout)
    req = pipe.request(image, PROMPT, keep=1.0)
    assert req.view.info["layout"].name == layout and req.bucket["name"].startswith(f"none-{layout}-")
    rendered = pipe.prompt.render(PROMPT)
    inputs, feats = _transformers_inputs(nxt, image, rendered)
    ids = inputs["input_ids"]
    assert int((ids == nxt.text.image_token_id).sum()) == feats.shape[0] == req.stitched.total == len(req.stitched.kept)
    theirs_embeds = nxt.model.get_input_embeddings()(ids)[0]
    theirs_embeds[ids[0] == nxt.text.image_token_id] = feats
    diff = float((torch.from_numpy(req.stitched.embeds[0]) - theirs_embeds).abs().max())
    assert diff < 1e-4, diff  # the stitched sequence is transformers' own, token for token
    ours = pipe.generate(image, PROMPT, keep=1.0, max_new_tokens=TOKENS)
    out = nxt.model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    theirs = out[0, ids.shape[1]:].tolist()
    eos = nxt.text.eos_token_id
    theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
    assert len(theirs) == TOKENS, "the comparison must cover 32 tokens"
    assert ours.token_ids == theirs


def _packed_tags(nxt, layout, size_hw):
    """transformers' own packing applied to token tags (view * N + patch; -1 for a newline): the order of the
    unpruned image sequence, independent of the runtime's stitching code."""
    n = nxt.side * nxt.side
    tags = torch.arange(layout.num_views * n, dtype=torch.float32).reshape(layout.num_views, n, 1)
    packed, _ = nxt.model.model.pack_image_features([tags], torch.tensor([list(size_hw)]), "default",
                                                    image_newline=torch.tensor([-1.0]))
    return packed[0][:, 0].long()


def _kept_tags(nxt, layout, out):
    n, s = nxt.side * nxt.side, nxt.side
    width = layout.raster[1]
    tags = set(out["base_indices"][0].tolist())
    for ri in out["raster_indices"][0][: int(out["raster_count"][0])].tolist():
        r, c = divmod(ri, width)
        view = 1 + (r // s) * layout.cols + c // s
        tags.add(view * n + (r % s) * s + c % s)
    return tags | {-1}


@pytest.mark.parametrize("method,layout,positions", [("gprune", "2x2", None), ("gprune", "1x3", "contiguous"),
                                                     ("fopru", "2x2", None), ("fopru", "1x3", "original"),
                                                     ("gridprune", "2x1", None)])
def test_pruned_greedy_output_equals_the_model_fed_the_same_kept_features(nxt, gprune_bundle, fopru_bundle,
                                                                          gridprune_bundle, method, layout, positions):
    bundle = {"gprune": gprune_bundle, "fopru": fopru_bundle, "gridprune": gridprune_bundle}[method]
    pipe = Pipeline(bundle, positions=positions)
    assert pipe.positions == (positions or {"gprune": "original"}.get(method, "contiguous"))
    image = _image_for(nxt, layout)
    req = pipe.request(image, PROMPT, keep=0.25)
    lay, out = req.view.info["layout"], req.outputs
    assert req.bucket["method"] == method and lay.name == layout
    # fp32 kept indices: the ONNX graph's are the PyTorch module's
    graph = AnyresVisionGraph(nxt, lay, method, 0.25, pipe.manifest["method"]["options"]).eval()
    mask = torch.from_numpy(lay.valid_mask(req.view.info["size_hw"]).astype(np.float32))
    text = (torch.from_numpy(pipe.text_embeds(PROMPT)),) if method == "gridprune" else ()  # the runtime's own
    ref = dict(zip(OUTPUTS, (t.numpy() for t in graph(torch.from_numpy(req.view.values["pixel_values"]), mask, *text))))
    count = int(ref["raster_count"][0])
    assert count == int(out["raster_count"][0]) and count < mask.sum() / 3
    assert np.array_equal(ref["base_indices"], out["base_indices"])
    assert np.array_equal(ref["raster_indices"][0, :count], out["raster_indices"][0, :count])
    # the reference sequence: transformers' unpruned packed features, filtered to the kept tokens
    rendered = pipe.prompt.render(PROMPT)
    _, feats = _transformers_inputs(nxt, image, rendered)
    tags = _packed_tags(nxt, lay, req.view.info["size_hw"])
    keep = torch.tensor([int(t) in _kept_tags(nxt, lay, out) for t in tags])
    offsets = torch.nonzero(keep)[:, 0]
    assert offsets.tolist() == req.stitched.kept.tolist()
    ids = req.ids
    where = ids.index(nxt.text.image_token_id)
    table = nxt.embedding_table()
    embeds = torch.cat([table[ids[:where]], feats[offsets], table[ids[where + 1:]]])[None]
    after = len(ids) - where - 1
    if pipe.positions == "original":
        pos = torch.cat([torch.arange(where), where + offsets, where + len(tags) + torch.arange(after)])
    else:
        pos = torch.arange(embeds.shape[1])
    assert torch.equal(torch.from_numpy(req.stitched.positions[0]), pos)
    assert float((torch.from_numpy(req.stitched.embeds[0]) - embeds[0]).abs().max()) < 1e-4
    theirs = _greedy(nxt, embeds, pos)
    ours = pipe.generate(image, PROMPT, keep=0.25, max_new_tokens=TOKENS)
    assert len(theirs) >= TOKENS
    assert ours.token_ids == theirs[:TOKENS]


def test_anyres_runtime_needs_neither_torch_nor_transformers(gprune_bundle):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlmprune.runtime.pipeline import open_bundle
        from vlmprune.sample import make_sample_image
        pipe = open_bundle({str(gprune_bundle)!r})
        r = pipe.generate(make_sample_image(900, 300), "hi", keep=0.25, max_new_tokens=3)
        assert r.bucket.startswith("gprune-1x3-"), r.bucket
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("TORCH-FREE OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "TORCH-FREE OK" in done.stdout, done.stderr[-2000:]


# --- command lines ------------------------------------------------------------------------------------------------------


def test_prune_run_and_prune_viz_on_an_anyres_bundle(gprune_bundle, tmp_path, capsys):
    import json

    from PIL import Image

    from vlmprune.runtime.cli import run_main, viz_main

    assert run_main.run([str(gprune_bundle), "--image", "sample", "--prompt", "hi", "--keep", "0.25",
                         "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bucket"].startswith("gprune-") and out["visual_tokens_kept"] < out["visual_tokens_total"] / 3
    png = tmp_path / "kept.png"
    assert viz_main.run([str(gprune_bundle), "--image", "sample", "-o", str(png)]) == 0
    with Image.open(png) as sheet:
        arr = np.asarray(sheet.convert("RGB"))
    assert sheet.width >= 2 * viz.PANEL and arr.std() > 20  # two panels (base view, raster) with a picture in them
    # very wide images leave no raster row after unpadding (as in the model): drawn and said, not an IndexError
    for size in [(10000, 1), (4000, 20), (1000, 10), (1, 3000)]:
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        assert viz_main.run([str(gprune_bundle), "--image", str(path), "--keep", "0.25", "-o", str(png)]) == 0, \
            capsys.readouterr().err


def test_raster_boxes_give_way_to_an_outline_when_cells_are_small():
    """At keep 1.0 a box per 7 px token would hide the picture: only the kept region's border is drawn."""
    from vlmprune.models.llava_next import viz as anyres_viz

    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:6] = True
    sheet = Image.new("RGB", (100, 100), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    xs, ys = viz.cell_edges(8, 80), viz.cell_edges(6, 60)
    anyres_viz._outline(draw, mask, xs, ys, 0, 0)
    arr = np.asarray(sheet)
    yellow = (arr == viz.BOX).all(axis=-1)
    assert yellow[ys[1], xs[2]:xs[6]].all() and yellow[ys[4] - 1, xs[2]:xs[6]].all()  # top and bottom borders
    assert not yellow[ys[2], xs[3] + 1:xs[5] - 1].any()  # no inner lines between kept cells


def test_prune_export_layouts_flag(tmp_path, capsys):
    from vlmprune.export.cli import main as export_main

    code = export_main.run(["--model", "tiny-llava-next", "--method", "fopru", "--keep", "0.5", "--layouts", "3x3",
                            "--out", str(tmp_path / "b"), "--no-validate"])
    assert code == 2 and "layout '3x3' is not one of" in capsys.readouterr().err
    code = export_main.run(["--model", "tiny-llava-next", "--method", "gprune", "--tokens", "100",
                            "--out", str(tmp_path / "c"), "--no-validate"])
    assert code == 2 and "--tokens is not available for LLaVA-NeXT" in capsys.readouterr().err


# --- one way in (issue 20) ----------------------------------------------------------------------------------------


def _same_answers_everywhere(bundle, tmp_path, image_size=(672, 336)):
    """prune-run's pipeline, PrunedVLM and prune-eval (zero items skipped, the bundle's own positions) give the same
    tokens on the same image, prompt and keep ratio."""
    import json

    from PIL import Image

    from vlmprune.runtime.api import PrunedVLM
    from vlmprune.runtime.eval_cli import main as eval_main

    folder = tmp_path / "data"
    folder.mkdir()
    make_sample_image(*image_size).save(folder / "a.png")
    (folder / "q.jsonl").write_text(json.dumps({"question_id": "1", "image": "a.png", "text": PROMPT}) + "\n")
    image = Image.open(folder / "a.png")
    ours = open_bundle(bundle).generate(image, PROMPT, keep=0.25, max_new_tokens=6)
    vlm = PrunedVLM(bundle, keep=0.25, max_new_tokens=6)
    assert vlm.generate(folder / "a.png", PROMPT) == ours.text and vlm.last.token_ids == ours.token_ids
    out = tmp_path / "eval"
    assert eval_main.run([str(bundle), "--data", str(folder / "q.jsonl"), "--keep", "0.25", "--out", str(out),
                          "--max-new-tokens", "6", "--plain-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["skipped"] == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    pruned = next(r for r in records if r["keep"] == 0.25)
    assert pruned["token_ids"] == ours.token_ids and pruned["bucket_used"] == ours.bucket
    return ours


def test_prune_run_prune_eval_and_pruned_vlm_agree(gprune_bundle, tmp_path):
    """G-Prune's default positions on LLaVA-NeXT are ``original``: prune-eval follows the bundle as prune-run does
    (it numbered contiguously before, and skipped every item of an anyres bundle)."""
    result = _same_answers_everywhere(gprune_bundle, tmp_path)
    assert open_bundle(gprune_bundle).positions == "original" and result.view.startswith("layout ")
