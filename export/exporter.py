"""``export_bundle``: model adapter -> pruning modules -> ONNX graphs -> validated bundle (written atomically)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

import vlmprune
from vlmprune.bundle import SCHEMA_VERSION, write_manifest
from vlmprune.errors import VlmpruneError
from vlmprune.prune import get_method
from vlmprune.prune.registry import validate_keep

from .buckets import Bucket, plan_buckets
from .decoder import DecoderGraph, decoder_dynamic_axes, decoder_io_names
from .graphs import BucketVisionGraph, TextEncoderGraph
from .lint import lint_all_targets
from .onnx_io import export_onnx, externalize
from .precision import fp16_vision
from .progress import Steps
from .publish import claim
from .targets import get_target
from .validate import summarise, validate_decoder, validate_text_encoder, validate_vision

VALIDATION_PROMPT = "What color is the car next to the house?"


@dataclass
class ExportRequest:
    model: str = "tiny-llava"
    method: str = "fopru"
    keeps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    out: Path | None = None
    target: str = "trt10"
    precision: str = "fp32"
    force: bool = False
    validate: bool = True
    clip: str | None = None
    trust_remote_code: bool = False


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    validation: dict | None
    timings: dict


def default_out(model: str, method: str) -> Path:
    stem = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return Path("exports") / f"{stem}-{method}"


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with Polygraphy (shape chains from the static input become constants, as TensorRT 8.5 wants)."""
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(3)  # folding leaves harmless optimizer warnings
    # Large tensors are left to be computed: folding would store e.g. an N x N position mask in every graph.
    return fold_constants(model, num_passes=2, error_ok=True, size_threshold=1 << 16)


def _io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]


def _versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {
        "vlmprune": vlmprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export_bundle(req: ExportRequest, steps: Steps | None = None) -> ExportResult:
    steps = steps or Steps()
    spec = get_method(req.method)
    target = get_target(req.target)
    if req.precision not in ("fp32", "fp16"):
        raise VlmpruneError(f"unknown precision {req.precision!r}", "use --precision fp32 or fp16")
    options = spec.parse_options(req.options)
    for keep in req.keeps:  # fail before the model loads
        validate_keep(keep)
    for k in req.tokens:
        if k < 1:
            raise VlmpruneError(f"--tokens {k} must be at least 1", "give a positive token budget")
    out = Path(req.out or default_out(req.model, req.method))
    with claim(out, req.force, sources=(req.model, req.clip)) as place:  # one writer per --out, see publish.py
        for line in place.cleaned:
            steps.log(line)
        return _export(req, steps, spec, target, options, out, place)


def _export(req: ExportRequest, steps: Steps, spec, target, options, out: Path, place) -> ExportResult:
    """The export proper, while ``place`` (the claim on ``--out``) is held."""
    torch.set_grad_enabled(False)
    with steps.step(f"load model {req.model}"), loading_errors(req.model):
        from vlmprune.models import load_model

        adapter = load_model(req.model, clip=req.clip, trust_remote_code=req.trust_remote_code)
    view = adapter.vision.views[0]
    buckets = plan_buckets(spec, options, view.num_patches, view.grid, req.keeps, req.tokens)
    needs_text = "text" in spec.needs
    if needs_text and adapter.clip is None:
        raise VlmpruneError(
            f"method {spec.name} needs a CLIP text tower and none was found for {req.model}",
            "pass --clip PATH|HF-ID (openai/clip-vit-large-patch14-336 layout)",
        )
    steps.log(f"buckets: {', '.join(f'{b.name} (keep {b.keep})' for b in buckets)}")

    sources = (req.model, req.clip, adapter.path, getattr(adapter.clip, "path", None))
    place.check(sources)  # the resolved model folders are known now
    tmp = place.make_temp()
    try:
        result = _build(req, adapter, spec, options, buckets, target, needs_text, tmp, steps)
        place.publish(tmp, sources)
    except BaseException:
        place.discard(tmp)
        raise
    result.path = out
    steps.log(f"bundle written to {out} in {steps.elapsed:.1f}s")
    return result


try:  # safetensors' own error type is not an OSError: a truncated file raises it from the header parser
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - safetensors comes with the export extra
    _SafetensorError = OSError


@contextlib.contextmanager
def loading_errors(model: str):
    """A checkpoint that cannot be read (truncated or empty safetensors, missing processor files, bad JSON) is the
    user's input, not a bug: one line naming it."""
    try:
        yield
    except VlmpruneError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, _SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise VlmpruneError(f"cannot load model {model}: {type(exc).__name__}: {first}",
                            "check that it is a complete Hugging Face checkpoint (config, safetensors, tokenizer, "
                            "processor files)") from None


def _build(req, adapter, spec, options, buckets: list[Bucket], target, needs_text, tmp: Path, steps: Steps):
    view = adapter.vision.views[0]
    graphs: dict[str, onnx.ModelProto] = {}
    modules: dict[str, tuple[torch.nn.Module, bool]] = {}
    pixels = torch.zeros(1, 3, *view.image_size)
    text_dim = adapter.clip.projection_dim if adapter.clip is not None else 0
    for bucket in buckets:
        with steps.step(f"export vision graph {bucket.name}"):
            method = get_method(bucket.method).build(bucket.k, view.grid, view.has_cls, **dict(bucket.options))
            if method.k != bucket.k:
                raise AssertionError(f"{bucket.name}: module returns K={method.k}")
            module = BucketVisionGraph(adapter, method).eval()
            uses_text = bucket.method != "none" and needs_text
            args = (pixels, torch.zeros(1, text_dim)) if uses_text else (pixels,)
            names = ["pixel_values", "text_embeds"] if uses_text else ["pixel_values"]
            with fp16_vision(adapter) if req.precision == "fp16" else contextlib.nullcontext():
                model = export_onnx(module, args, input_names=names, output_names=["image_embeds", "kept_indices"],
                                    opset=target.opset)
            graphs[bucket.file] = _fold(model)
            modules[bucket.file] = (module, uses_text)

    text_module = None
    if needs_text:
        with steps.step("export CLIP text encoder"):
            text_module = TextEncoderGraph(adapter).eval()
            ids = adapter.clip.tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"]
            model = export_onnx(text_module, (ids,), input_names=["input_ids"], output_names=["text_embeds"],
                                dynamic_axes={"input_ids": {1: "text_length"}}, opset=target.opset)
            graphs["text_encoder.onnx"] = _fold(model)

    with steps.step("export decoder"):
        decoder = DecoderGraph(adapter).eval()
        names_in, names_out = decoder_io_names(adapter.text.num_layers)
        decoder_model = export_onnx(decoder, decoder.example_inputs(), input_names=names_in, output_names=names_out,
                                    dynamic_axes=decoder_dynamic_axes(adapter.text.num_layers), opset=target.opset)
        embed = adapter.embedding_table().detach().float().numpy()
        np.save(tmp / "embed_tokens.npy", embed)

    with steps.step("lint for TensorRT"):
        lint = {name: lint_all_targets(m) for name, m in {**graphs, "decoder.onnx": decoder_model}.items()}
        for name, per_target in lint.items():
            t = per_target[target.name]
            if not t["ok"]:
                first = next(f for f in t["findings"] if f["level"] == "error")
                raise VlmpruneError(f"{name} fails the {target.name} lint: {first['message']}", "report this as a bug")

    with steps.step("write bundle"):
        vision_files = {k: v for k, v in graphs.items() if k.startswith("vision_")}
        sizes = externalize(vision_files, tmp, "vision.weights")
        if "text_encoder.onnx" in graphs:
            sizes.update(externalize({"text_encoder.onnx": graphs["text_encoder.onnx"]}, tmp, "text_encoder.weights"))
        sizes.update(externalize({"decoder.onnx": decoder_model}, tmp, "decoder.weights"))
        adapter.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        if needs_text:
            adapter.clip.tokenizer.backend_tokenizer.save(str(tmp / "clip_tokenizer.json"))

    validation = None
    if req.validate:
        with steps.step("validate against PyTorch"):
            checks = []
            text_embeds = None
            if text_module is not None:
                ids = adapter.clip.tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"]
                checks += validate_text_encoder(tmp, "text_encoder.onnx", text_module, ids)
                text_embeds = text_module(ids)
            checks += validate_vision(tmp, modules, adapter, text_embeds, req.precision)
            checks += validate_decoder(tmp, "decoder.onnx", decoder, adapter.text.num_layers)
            validation = summarise(checks, req.precision)
            (tmp / "validation.json").write_text(json.dumps(validation, indent=2) + "\n")
            _print_validation(validation, steps)
            if not validation["passed"]:
                failed = [c for c in validation["checks"] if not c["passed"]]
                c = failed[0]
                raise VlmpruneError(
                    f"validation failed for {len(failed)} check(s), first: {c['graph']} {c['case']} {c['output']} "
                    f"(max abs diff {c['max_abs_diff']:.3g} > {c['allowed']:.3g}, overlap {c['index_overlap']})",
                    "no bundle was published; report this with the model and method",
                )

    manifest = _manifest(req, adapter, spec, options, buckets, target, graphs, decoder_model, lint, validation, tmp)
    write_manifest(tmp, manifest)
    return ExportResult(tmp, manifest, validation, dict(steps.timings))


def _print_validation(validation: dict, steps: Steps) -> None:
    by_graph: dict[str, list] = {}
    for c in validation["checks"]:
        by_graph.setdefault(c["graph"], []).append(c)
    for graph, checks in by_graph.items():
        worst = max(c["max_abs_diff"] for c in checks)
        idx = [c for c in checks if c["output"] == "kept_indices"]
        extra = f", kept indices identical in {sum(bool(c['indices_equal']) for c in idx)}/{len(idx)}" if idx else ""
        floor = validation.get("tolerance", {}).get("min_overlap", 1.0)
        if idx and floor < 1.0:  # fp16 passes on set overlap: print the figure that made it pass, and the bar
            extra += f", index overlap min {min(c['index_overlap'] for c in idx):.3f} (needs >= {floor})"
        status = "ok" if all(c["passed"] for c in checks) else "FAILED"
        steps.log(f"  {status:6s} {graph}: max abs diff {worst:.2e}{extra}")


def _manifest(req, adapter, spec, options, buckets, target, graphs, decoder_model, lint, validation, folder):
    view = adapter.vision.views[0]
    from vlmprune.models.presets import PRESETS

    bucket_entries = []
    for b in buckets:
        inputs, outputs = _io(graphs[b.file])
        bucket_entries.append({
            "name": b.name, "method": b.method, "keep": b.keep, "k": b.k, "options": dict(b.options),
            "file": b.file, "inputs": inputs, "outputs": outputs,
        })
    dec_in, dec_out = _io(decoder_model)
    text = adapter.text
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": _versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**adapter.describe(), "preset": req.model in PRESETS},
        "method": {"name": spec.name, "options": options, "needs": sorted(spec.needs)},
        "target": target.name,
        "opset": target.opset,
        "precision": req.precision,
        "preprocessing": adapter.preprocessing.to_dict(),
        "vision": {
            "view": {"name": view.name, "image_size": list(view.image_size), "grid": list(view.grid),
                     "num_patches": view.num_patches, "has_cls": view.has_cls},
            "weights": "vision.weights",
            "buckets": bucket_entries,
        },
        "text_encoder": None,
        "prompt": {
            "tokenizer": "tokenizer.json",
            "chat_template": text.chat_template,
            "image_token": text.image_token,
            "image_token_id": text.image_token_id,
            "stitch": "replace_placeholder",  # the single image token is replaced by the K kept image tokens
            "positions": "contiguous",
        },
        "decoder": {
            "file": "decoder.onnx",
            "weights": "decoder.weights",
            "inputs": dec_in,
            "outputs": dec_out,
            "num_layers": text.num_layers,
            "num_heads": text.num_heads,
            "num_kv_heads": text.num_kv_heads,
            "head_dim": text.head_dim,
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
            "max_context": text.max_context,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "pad_token_id": text.pad_token_id,
            "kv_dtype": "float32",
            "embeddings": {"file": "embed_tokens.npy", "shape": [text.vocab_size, text.hidden_size], "dtype": "float32"},
        },
        "lint": lint,
        "validation": None if validation is None else {"file": "validation.json", "passed": validation["passed"],
                                                       "checks": len(validation["checks"])},
    }
    if "text_encoder.onnx" in graphs:
        t_in, t_out = _io(graphs["text_encoder.onnx"])
        manifest["text_encoder"] = {
            "file": "text_encoder.onnx", "weights": "text_encoder.weights", "inputs": t_in, "outputs": t_out,
            "tokenizer": "clip_tokenizer.json", "max_length": adapter.clip.max_length,
            "projection_dim": adapter.clip.projection_dim,
        }
    return manifest
