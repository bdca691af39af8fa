"""The edge runtime: torch-free imports, preprocessing and prompt parity with transformers, greedy parity with
``generate`` (unpruned and pruned), stitching, sampling, and bad input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preset_geometry import spec_k
from vlmprune.errors import VlmpruneError
from vlmprune.export.exporter import ExportRequest, export_bundle
from vlmprune.export.progress import Steps
from vlmprune.models import PRESETS
from vlmprune.prune import METHODS
from vlmprune.runtime import viz
from vlmprune.runtime.cli import run_main, viz_main
from vlmprune.runtime.pipeline import Pipeline
from vlmprune.runtime.preprocess import load_image, to_rgb
from vlmprune.runtime.sampling import next_token
from vlmprune.runtime.stitch import stitch
from vlmprune.sample import make_sample_image

PROMPT = "What is next to the red house?"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "fopru"
    return export_bundle(ExportRequest(method="fopru", keeps=[0.25], out=out), Steps(quiet=True)).path


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline(bundle)


def test_runtime_needs_neither_torch_nor_transformers(bundle, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from vlmprune.runtime.cli import run_main, viz_main
        code = run_main.run([{str(bundle)!r}, "--image", "sample", "--prompt", "hi", "--max-new-tokens", "3", "--json"])
        assert code == 0, code
        code = viz_main.run([{str(bundle)!r}, "--image", "sample", "-o", {str(tmp_path / "v.png")!r}])
        assert code == 0, code
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("TORCH-FREE OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "TORCH-FREE OK" in done.stdout, done.stderr[-2000:]


# --- preprocessing -----------------------------------------------------------------------------------------------

S = PRESETS[ExportRequest.model].image_size  # the bundle's preset: the image side its processor crops to
SIZES = [(S, S), (500, 375), (375, 500), (100, 80), (1000, 200), (S + 1, 901)]


def _image(mode, size, seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.asarray(make_sample_image(w, h))
    noisy = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        alpha = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L")
        rgba.putalpha(alpha)
        return rgba
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return img


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_preprocessing_matches_transformers(tiny, pipe, size, mode):
    image = _image(mode, size)
    ours = pipe.preprocess(image)
    theirs = tiny.processor.image_processor(image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, *tiny.vision.views[0].image_size)
    assert np.max(np.abs(ours - theirs)) <= 1e-5  # the stated tolerance: float32 rounding only


def test_sixteen_bit_images_are_scaled_not_clipped(tiny, pipe):
    eight = np.asarray(_image("L", (400, 300)))
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # full 16-bit range
    assert sixteen.mode.startswith("I;16") or sixteen.mode == "I"
    rgb = to_rgb(sixteen)
    assert np.array_equal(np.asarray(rgb)[..., 0], eight)
    ours = pipe.preprocess(sixteen)
    theirs = tiny.processor.image_processor(Image.fromarray(eight).convert("RGB"), return_tensors="np")["pixel_values"]
    assert np.max(np.abs(ours - theirs)) <= 1e-5


def test_crop_box_is_the_region_the_model_sees(pipe):
    left, top, right, bottom = pipe.preprocess.crop_box((672, 400))
    assert (round(top), round(bottom)) == (0, 400)
    assert right - left == pytest.approx(400, abs=2) and left == pytest.approx(136, abs=2)


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bad_images_get_one_clear_line(tmp_path):
    with pytest.raises(VlmpruneError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(VlmpruneError, match="cannot read image .*corrupt"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    make_sample_image().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(VlmpruneError, match="cannot read image"):
        load_image(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(VlmpruneError) as info:
        load_image(text)
    assert str(info.value) == (f"cannot read image {text}: not an image format Pillow recognises (it is a text file); "
                               "pass a valid PNG, JPEG, WebP, BMP or TIFF file")
    for url in ("https://example.com/cat.jpg", "http://x/y.png", "s3://bucket/key.jpg"):
        with pytest.raises(VlmpruneError, match=f"image {url} is a URL; vlmprune .* does not fetch URLs"):
            load_image(url)
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 40000, 30000)
    with pytest.raises(VlmpruneError, match=r"40000x30000 \(1200 MP\), over the 100 MP limit"):
        load_image(huge)


# --- prompt and stitching --------------------------------------------------------------------------------------------


def test_another_models_image_placeholder_is_named_not_kept_as_text(pipe):
    from vlmprune.runtime.prompt import PromptBuilder

    m = pipe.manifest["prompt"]
    assert m["image_token"] == "<image>"
    with pytest.raises(VlmpruneError) as info:
        pipe.prompt.render("<|image_pad|>\nWhat is this?")
    assert str(info.value) == ("the prompt holds '<|image_pad|>', which this bundle reads as plain text: its image "
                               "placeholder is '<image>'; write '<image>' where the image goes, or leave the "
                               "placeholder out (the chat template then places the image)")
    # a bundle whose placeholder is <|image_pad|> (Qwen2.5-VL's): the LLaVA spelling is named, its own is kept
    qwen_like = PromptBuilder(pipe.bundle.path(m["tokenizer"]), {**m, "image_token": "<|image_pad|>"})
    with pytest.raises(VlmpruneError, match="holds '<image>', which this bundle reads as plain text: its image "
                                            "placeholder is '<|image_pad|>'"):
        qwen_like.render("<image> What is this?")
    assert "<|image_pad|>" in qwen_like.render("<|image_pad|> What is this?")
    assert pipe.prompt.render("What is <b>this</b>? An <imaginary> tag") is not None  # other tags are text


def test_prompt_matches_the_processor(tiny, pipe):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rendered = tiny.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert pipe.prompt.render(PROMPT) == rendered
    expanded = tiny.processor(images=make_sample_image(), text=rendered, return_tensors="pt")["input_ids"][0].tolist()
    image_id = pipe.prompt.image_token_id
    collapsed = [t for i, t in enumerate(expanded) if t != image_id or expanded[i - 1] != image_id]
    assert pipe.prompt.encode(PROMPT) == collapsed


def test_placeholder_in_the_prompt_is_kept_where_the_user_put_it(pipe):
    assert pipe.prompt.render("Look: <image> what is it?").startswith("USER: Look: <image> what is it?")
    with pytest.raises(VlmpruneError, match="2 image placeholders"):
        pipe.prompt.render("<image> and <image>")


def test_stitch_positions():
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = [1, 5, 3, 6, 7]  # image token 3 at index 2
    image = np.full((1, 2, 4), -1, np.float32)
    kept = np.array([[1, 4]])
    embeds, pos, nxt = stitch(ids, 3, table, image, kept, num_patches=6)
    assert embeds.shape == (1, 6, 4) and np.array_equal(embeds[0, 2:4], image[0])
    assert np.array_equal(embeds[0, 4], table[6]) and pos[0].tolist() == [0, 1, 2, 3, 4, 5] and nxt == 6
    _, pos, nxt = stitch(ids, 3, table, image, kept, num_patches=6, positions="original")
    assert pos[0].tolist() == [0, 1, 3, 6, 8, 9] and nxt == 10


# --- parity with transformers generate -------------------------------------------------------------------------------


def test_unpruned_greedy_output_equals_transformers_generate(tiny, bundle):
    pipe = Pipeline(bundle)
    image = make_sample_image()
    ours = pipe.generate(image, PROMPT, keep=1.0, max_new_tokens=40)
    n = tiny.vision.views[0].num_patches
    assert ours.bucket == f"none-k{n}" and ours.visual_tokens_kept == n
    rendered = pipe.prompt.render(PROMPT)
    inputs = tiny.processor(images=image, text=rendered, return_tensors="pt")
    out = tiny.model.generate(**inputs, max_new_tokens=40, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = pipe.decoder_spec["eos_token_id"]
    theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
    assert len(theirs) >= 32, "the comparison must cover at least 32 tokens"
    assert ours.token_ids == theirs


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_pruned_greedy_output_equals_generate_fed_the_same_kept_features(tiny, bundle, positions):
    pipe = Pipeline(bundle, positions=positions)
    image = make_sample_image()
    ours = pipe.generate(image, PROMPT, keep=0.25, max_new_tokens=40)
    from vlmprune.export.graphs import BucketVisionGraph

    view = tiny.vision.views[0]
    k = spec_k(0.25, view.num_patches)
    assert ours.visual_tokens_kept == k
    graph = BucketVisionGraph(tiny, METHODS["fopru"].build(k, view.grid, True)).eval()
    with torch.no_grad():
        feats, kept = graph(torch.from_numpy(pipe.preprocess(image)))
    assert kept[0].tolist() == ours.kept_indices
    ids = pipe.prompt.encode(PROMPT)
    where = ids.index(pipe.prompt.image_token_id)
    table = tiny.embedding_table().detach()
    embeds = torch.cat([table[ids[:where]], feats[0], table[ids[where + 1:]]])[None]
    kwargs = {}
    if positions == "original":
        n_after = len(ids) - where - 1
        pos = torch.cat([torch.arange(where), where + kept[0], where + view.num_patches + torch.arange(n_after)])
        kwargs = _original_positions_kwargs(pos)
    theirs = _greedy_with_transformers(tiny, embeds, 40, **kwargs)
    assert len(theirs) >= 32
    assert ours.token_ids == theirs


def _original_positions_kwargs(pos):
    return {"positions": pos}


def _greedy_with_transformers(tiny, embeds, steps, positions=None):
    """``generate(inputs_embeds=...)`` for contiguous positions; with explicit positions a plain greedy loop over the
    same transformers model (generate has no way to take custom prefill positions)."""
    eos = tiny.text.eos_token_id
    if positions is None:
        out = tiny.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                  max_new_tokens=steps, do_sample=False)
        tokens = out[0].tolist()
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=tiny.model.config.text_config)
        pos = positions[None]
        x = embeds
        tokens = []
        nxt = int(positions[-1]) + 1
        with torch.no_grad():
            for _ in range(steps):
                out = tiny.model(inputs_embeds=x, position_ids=pos, past_key_values=cache, use_cache=True)
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                cache = out.past_key_values
                x = tiny.embedding_table()[[token]][None]
                pos = torch.tensor([[nxt]])
                nxt += 1
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# --- generation options and bad input --------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(pipe):
    image = make_sample_image()
    a = pipe.generate(image, PROMPT, max_new_tokens=12, temperature=1.5, seed=3)
    b = pipe.generate(image, PROMPT, max_new_tokens=12, temperature=1.5, seed=3)
    greedy = pipe.generate(image, PROMPT, max_new_tokens=12)
    nucleus = pipe.generate(image, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-9, seed=5)
    assert a.token_ids == b.token_ids
    assert nucleus.token_ids == greedy.token_ids
    logits = np.array([0.0, 3.0, 3.0, 1.0])
    assert next_token(logits) == 1


def test_streaming_concatenates_to_the_text(pipe):
    pieces = []
    result = pipe.generate(make_sample_image(), PROMPT, max_new_tokens=20, on_text=pieces.append)
    assert "".join(pieces) == result.text
    t = result.timings
    assert t.ttft_ms >= t.prefill_ms > 0 and t.vision_ms > 0 and t.tpot_ms > 0


def test_prompt_overflowing_the_context_says_the_numbers(tiny, pipe):
    n = tiny.vision.views[0].num_patches
    with pytest.raises(VlmpruneError, match=rf"the prompt is \d+ tokens \(\d+ text \+ {n} image\), which fills the "
                                            rf"model's context of {tiny.text.max_context}"):
        pipe.generate(make_sample_image(), "sky " * 600, keep=1.0)


def test_generation_stops_at_the_context(pipe):
    result = pipe.generate(make_sample_image(), "sky " * 300, keep=1.0, max_new_tokens=500)
    assert result.stop_reason in ("context", "eos")
    assert result.prompt_tokens + result.tokens_generated <= 1024


def test_missing_altered_and_newer_bundles(bundle, tmp_path, capsys):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "embed_tokens.npy", "r+b") as f:
        f.seek(300)
        f.write(b"\x00\x00\x00\x01")
    assert run_main.run([str(copy), "--image", "sample", "--prompt", "hi"]) == 2
    assert "embed_tokens.npy" in capsys.readouterr().err
    shutil.copy(bundle / "embed_tokens.npy", copy / "embed_tokens.npy")
    (copy / "tokenizer.json").unlink()
    assert run_main.run([str(copy), "--image", "sample", "--prompt", "hi"]) == 2
    assert "tokenizer.json is missing" in capsys.readouterr().err
    shutil.copy(bundle / "tokenizer.json", copy / "tokenizer.json")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_main.run([str(copy), "--image", "sample", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "schema version 99 is newer" in err and len(err.splitlines()) == 1


def test_cli_bad_image_and_keep(bundle, tmp_path, capsys):
    assert run_main.run([str(bundle), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_main.run([str(bundle), "--image", "sample", "--prompt", "hi", "--keep", "1.5"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err


def test_cli_run_picks_the_bucket_and_prints_timings(tiny, bundle, capsys):
    n = tiny.vision.views[0].num_patches
    k = spec_k(0.25, n)
    assert run_main.run([str(bundle), "--image", "sample", "--prompt", PROMPT, "--keep", "0.2",
                         "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert f"no bucket for keep 0.2; using the next larger, fopru-k{k}" in captured.err
    assert "TTFT" in captured.out and "TPOT" in captured.out and f"{k}/{n} visual tokens" in captured.out
    assert run_main.run([str(bundle), "--image", "sample", "--prompt", PROMPT, "--json", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens_kept"] == k and result["tokens_generated"] <= 3
    assert set(result["timings"]) >= {"preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "tpot_ms"}


def test_viz_writes_one_panel_per_bucket(bundle, tmp_path):
    out = tmp_path / "viz.png"
    assert viz_main.run([str(bundle), str(bundle), "--image", "sample", "--keep", "0.25", "1.0", "-o", str(out)]) == 0
    img = Image.open(out)
    assert img.size[0] > 2 * viz.PANEL and img.size[1] > 2 * viz.PANEL  # 2 rows x 2 panels
    arr = np.asarray(img.convert("RGB"))
    assert (arr == [255, 210, 0]).all(-1).sum() > 1000  # kept-patch outlines drawn
