"""Qwen2.5-VL vision graphs: one static graph per image size and budget bucket (``export/qwen_graphs.py``), written
the exporter's way (weights streamed into one shared ``vision.weights``, linted for every TensorRT target, each graph
validated in ONNX Runtime against its PyTorch module as soon as it is written)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmprune.errors import VlmpruneError

from .buckets import Bucket, plan_buckets
from .lint import lint_all_targets
from .onnx_io import WeightsFile, save_graph
from .progress import Steps
from .validate import TOLERANCE, _compare, _indices, _session


@dataclass(frozen=True)
class QwenBucket(Bucket):
    """A bucket at one static image size (h, w); names carry the size so several sizes share one bundle."""

    image_size: tuple[int, int] = (448, 448)

    @property
    def size_tag(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}"

    @property
    def name(self) -> str:
        return f"{self.method}-{self.size_tag}-k{self.k}"

    @property
    def file(self) -> str:
        return f"vision_{self.method}_{self.size_tag}_k{self.k}.onnx"


def plan_qwen(spec, options: dict, adapter, keeps=(), tokens=(), image_sizes=None) -> list[QwenBucket]:
    """Buckets for every image size (default: the adapter's, 448x448), the ``none`` reference first per size."""
    sizes = list(image_sizes or [adapter.image_size])
    out = []
    for size in sizes:
        adapter.set_image_size(size)
        view = adapter.vision.views[0]
        for b in plan_buckets(spec, options, view.num_patches, view.grid, keeps, tokens):
            out.append(QwenBucket(b.method, b.keep, b.k, b.options, tuple(size)))
    return out


@contextlib.contextmanager
def fp16_visual(adapter):
    """The encoder and merger in fp16 with fp32 RMSNorms (as the family's fp32 scopes pin them in TensorRT); the
    exact fp32 weights are restored afterwards."""
    visual = adapter.visual
    saved = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    hooks = []
    try:
        visual.half()
        for module in visual.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.float()
                hooks.append(module.register_forward_pre_hook(lambda mod, args: (args[0].float(),)))
                hooks.append(module.register_forward_hook(lambda mod, args, out: out.half()))
        yield
    finally:
        for h in hooks:
            h.remove()
        visual.float()
        visual.load_state_dict(saved)


def validation_cases(adapter, seed: int = 0, clip: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """The tool's sample image through the runtime's own preprocessing at the bucket size (and the auxiliary CLIP's
    view of it for GridPrune), and random input."""
    from vlmprune.runtime.qwen_preprocess import QwenPreprocessor, clip_view
    from vlmprune.sample import make_sample_image

    image = make_sample_image()
    pixels = (torch.from_numpy(QwenPreprocessor(adapter.preprocessing.to_dict())(image)),)
    if clip:
        pixels += (torch.from_numpy(clip_view(image, adapter.clip_constants())),)
    g = torch.Generator().manual_seed(seed)
    return {"sample image": pixels, "random input": tuple(torch.randn(p.shape, generator=g) for p in pixels)}


def validate_qwen_graph(path: Path, module: nn.Module, adapter, precision: str, text_embeds=None) -> list:
    tol = TOLERANCE[precision]
    sess = _session(path)
    checks = []
    uses_text = getattr(module, "uses_text", False)
    for case, pixels in validation_cases(adapter, clip=uses_text).items():
        args = (*pixels, text_embeds) if uses_text else pixels
        with torch.no_grad():
            ref_embeds, ref_idx = module(*args)
        names = ["pixel_values", "clip_pixel_values", "text_embeds"] if uses_text else ["pixel_values"]
        feeds = {n: a.numpy() for n, a in zip(names, args)}
        got_embeds, got_idx = sess.run(["image_embeds", "kept_indices"], feeds)
        idx = _indices(path.name, case, ref_idx.numpy(), got_idx, tol)
        checks.append(idx)
        if idx.indices_equal:
            checks.append(_compare(path.name, case, "image_embeds", ref_embeds.numpy(), got_embeds, tol))
        else:  # compare the tokens both kept
            common = sorted(set(ref_idx[0].tolist()) & set(got_idx[0].tolist()))
            r = ref_embeds[0].numpy()[[ref_idx[0].tolist().index(i) for i in common]]
            o = got_embeds[0][[got_idx[0].tolist().index(i) for i in common]]
            checks.append(_compare(path.name, case, "image_embeds (common tokens)", r, o, tol))
    return checks


def export_qwen_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp: Path, scratch: Path,
                       steps: Steps, checks: list) -> tuple[list[dict], dict]:
    """``export_vision`` for Qwen2.5-VL (same signature and records, plus each bucket's image size)."""
    from .exporter import _check_lint, _clear, _export_streamed, _io
    from .qwen_graphs import QwenVisionGraph

    if needs_text and text_embeds is None:
        raise VlmpruneError("GridPrune on Qwen2.5-VL needs the prompt's CLIP embedding for its validation",
                            "report this as a bug")
    records, lint = [], {}
    with WeightsFile(tmp / "vision.weights") as weights:
        for bucket in buckets:
            adapter.set_image_size(bucket.image_size)
            n = bucket.image_size[0] * bucket.image_size[1] // adapter.vision.patch_size**2
            vcfg = adapter.model.config.vision_config
            pixels = torch.zeros(n, 3 * vcfg.temporal_patch_size * vcfg.patch_size**2)
            with steps.step(f"export vision graph {bucket.name}"):
                module = QwenVisionGraph(adapter, bucket.method, bucket.k, dict(bucket.options)).eval()
                if module.k != bucket.k:
                    raise AssertionError(f"{bucket.name}: module returns K={module.k}")
                args, names = (pixels,), ["pixel_values"]
                if module.uses_text:  # GridPrune: the auxiliary CLIP's view of the image and the prompt embedding
                    side = adapter.clip_image_size
                    args += (torch.zeros(1, 3, side, side), torch.zeros(1, adapter.clip.projection_dim))
                    names += ["clip_pixel_values", "text_embeds"]
                with fp16_visual(adapter) if req.precision == "fp16" else contextlib.nullcontext():
                    model = _export_streamed(module, args, scratch / bucket.file, weights, input_names=names,
                                             output_names=["image_embeds", "kept_indices"], opset=target.opset)
                lint[bucket.file] = lint_all_targets(model)
                _check_lint(bucket.file, lint[bucket.file], target)
                save_graph(model, tmp / bucket.file)
                inputs, outputs = _io(model)
                del model
                _clear(scratch)
                weights.flush()
            records.append({"name": bucket.name, "method": bucket.method, "keep": bucket.keep, "k": bucket.k,
                            "options": dict(bucket.options), "file": bucket.file, "inputs": inputs,
                            "outputs": outputs, "image_size": list(bucket.image_size),
                            "grid": list(adapter.vision.views[0].grid)})
            if req.validate:
                with steps.step(f"validate {bucket.file}"):
                    checks += validate_qwen_graph(tmp / bucket.file, module, adapter, req.precision, text_embeds)
    return records, lint


# Default positions per method, from the authors' code (specs/methods.md): G-Prune keeps original positions,
# FoPru's lab code uses contiguous ones; the baselines keep the model's own (original) layout.
DEFAULT_POSITIONS = {"fopru": "contiguous"}


def export_qwen_folder(model: str, out: Path, method: str, *, keeps=(), tokens=(), image_sizes=None,
                       options: dict | None = None, precision: str = "fp32", validate: bool = True,
                       steps: Steps | None = None, target: str = "trt10") -> dict:
    """A Qwen2.5-VL export folder for ``runtime/qwen_pipeline.py``: the vision graphs (one per image size and
    bucket), the M-RoPE decoder (fp32), the embedding table, the tokenizer and ``qwen.json``. Written into a
    temporary folder and renamed into place, so ``out`` is either absent or complete."""
    from vlmprune.atomic import make_temp_dir, remove_temp, rename_noreplace
    from vlmprune.models import load_model
    from vlmprune.prune import get_method

    from .qwen_decoder import export_qwen_decoder, save_embeddings
    from .targets import get_target

    steps = steps or Steps()
    out = Path(out)
    if out.exists():
        raise VlmpruneError(f"{out} already exists", "choose another --out (nothing was overwritten)")
    spec = get_method(method)
    opts = spec.parse_options(options)
    torch.set_grad_enabled(False)
    with steps.step(f"load model {model}"):
        adapter = load_model(model, method=spec.name, needs=spec.needs)
    if adapter.arch != "qwen2_5_vl":
        raise VlmpruneError(f"{model} is not a Qwen2.5-VL model", "use prune-export for the LLaVA families")
    buckets = plan_qwen(spec, opts, adapter, keeps, tokens, image_sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        checks: list = []
        req = type("Req", (), {"precision": precision, "validate": validate})()
        needs_text = "text" in spec.needs
        text_module = text_embeds = None
        if needs_text:
            from .exporter import VALIDATION_PROMPT
            from .graphs import TextEncoderGraph

            text_module = TextEncoderGraph(adapter).eval()
            text_embeds = text_module(adapter.clip.tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"])
        records, lint = export_qwen_vision(req, adapter, buckets, get_target(target), needs_text, text_embeds, tmp,
                                           scratch, steps, checks)
        text_record = None
        if text_module is not None:
            from .exporter import export_text_encoder

            text_record, text_lint = export_text_encoder(req, adapter, text_module, get_target(target), tmp, scratch,
                                                         steps, checks)
            lint.update(text_lint)
            adapter.clip.tokenizer.backend_tokenizer.save(str(tmp / "clip_tokenizer.json"))
        scratch.rmdir()
        failed = [c for c in checks if not c.passed]
        if failed:
            raise VlmpruneError(f"validation failed for {len(failed)} vision check(s), first: {failed[0]}",
                                "nothing was written; report this with the model and method")
        for r in records:
            r["positions"] = DEFAULT_POSITIONS.get(r["method"], "original")
        with steps.step("export decoder (fp32, M-RoPE position_ids [3, B, S])"):
            decoder = export_qwen_decoder(adapter, tmp / "decoder.onnx", tmp / "decoder.weights")
            lint["decoder.onnx"] = lint_all_targets(decoder)
            del decoder
            save_embeddings(adapter, tmp / "embed_tokens.npy")
        adapter.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        text = adapter.text
        qwen = {
            "family": adapter.family.to_dict(),
            "model": adapter.describe(),
            "preprocessing": adapter.preprocessing.to_dict(),
            "buckets": records,
            "prompt": {"tokenizer": "tokenizer.json", "chat_template": text.chat_template,
                       "image_token": text.image_token, "image_token_id": text.image_token_id},
            "decoder": {"file": "decoder.onnx", "weights": "decoder.weights", "embeddings": "embed_tokens.npy",
                        "num_layers": text.num_layers, "num_kv_heads": text.num_kv_heads, "head_dim": text.head_dim,
                        "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
                        "max_context": text.max_context, "eos_token_id": text.eos_token_id,
                        "mrope_section": list(adapter.mrope_section)},
            "text_encoder": text_record,
            "auxiliary_clip": adapter.clip_constants() if needs_text else None,
            "lint": {f: {t: v["ok"] for t, v in per.items()} for f, per in lint.items()},
            "validation": [c.__dict__ for c in checks],
        }
        (tmp / "qwen.json").write_text(json.dumps(qwen, indent=2) + "\n")
        rename_noreplace(tmp, out)
    finally:
        remove_temp(tmp)
    return qwen


def qwen_manifest(manifest: dict, adapter, spec) -> None:
    """The Qwen-specific parts of a bundle manifest: the auxiliary CLIP's preprocessing (GridPrune) and the default
    positions of the method (the runtime computes the M-RoPE positions from the buckets' grid and these)."""
    if "text" in spec.needs:
        manifest["auxiliary_clip"] = adapter.clip_constants()
    manifest["prompt"]["positions"] = DEFAULT_POSITIONS.get(spec.name, "original")
