"""``export_bundle``: model adapter -> pruning modules -> ONNX graphs -> validated bundle (written atomically)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
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
from vlmprune.graph_io import DecoderNames, with_kinds
from vlmprune.prune import get_method
from vlmprune.prune.registry import validate_keep

from .buckets import Bucket
from .decoder import decoder_io
from .decoder_fused import export_fused_decoder
from .graphs import TextEncoderGraph
from .lint import lint_all_targets
from .onnx_io import WeightsFile, attach_weights, export_onnx, save_graph
from .progress import Steps
from .publish import claim
from .targets import get_target
from .quantize import BITS, quantize_decoder
from .validate import GREEDY_TOKENS, summarise, validate_decoder, validate_text_encoder

VALIDATION_PROMPT = "What color is the car next to the house?"
DECODER_PRECISIONS = ("fp32", "fp16", "int8", "int4")


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
    decoder_precision: str | None = None  # None: fp16 for checkpoints stored in fp16/bf16, fp32 otherwise
    force: bool = False
    validate: bool = True
    clip: str | None = None
    trust_remote_code: bool = False
    fused_decoder: bool | None = None  # ONNX Runtime's fused decoder too; None: when onnxruntime-genai is installed
    # family-only options (the family's declared FamilyOption dests, e.g. a multi-view family's layouts), parsed
    family_options: dict = field(default_factory=dict)


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


def _io(model: onnx.ModelProto, kinds: dict | None = None) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs for the manifest, each with its kind (``vlmprune.graph_io``). ``kinds``: name ->
    kind or (kind, layer); None for graphs whose tensors this exporter names by their kind (vision, text encoder)."""
    def describe(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    inputs, outputs = [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]
    if kinds is None:
        kinds = {v["name"]: v["name"] for v in inputs + outputs}
    return with_kinds(inputs, kinds), with_kinds(outputs, kinds)


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
    if req.decoder_precision not in (None, *DECODER_PRECISIONS):
        raise VlmpruneError(f"unknown decoder precision {req.decoder_precision!r}",
                            f"use --decoder-precision {'|'.join(DECODER_PRECISIONS)}")

    torch.set_grad_enabled(False)
    with steps.step(f"load model {req.model}"), loading_errors(req.model):
        from vlmprune.models import load_model
        from vlmprune.models.loading import checkpoint_dtype, model_family, resolve_path

        family = model_family(req.model)  # config.json only: family-specific options are checked before loading
        check_family_options(family, req.family_options, req.model)
        missing_fused = dict(family.missing_decoders).get("fused")
        if req.fused_decoder and missing_fused:  # asked for by name: refused before the weights load
            raise VlmpruneError(f"--fused-decoder cannot be made for {family.name}: {missing_fused}",
                                "leave out --fused-decoder")
        if req.decoder_precision is None:  # follow the checkpoint: a published fp16/bf16 one stays half precision
            stored = checkpoint_dtype(resolve_path(req.model))
            req.decoder_precision = "fp16" if stored in ("F16", "BF16") else "fp32"
        adapter = load_model(req.model, clip=req.clip, trust_remote_code=req.trust_remote_code,
                             decoder_dtype="float32" if req.decoder_precision == "fp32" else "float16",
                             method=spec.name, needs=spec.needs)
    steps.log(f"decoder precision: {req.decoder_precision}")
    hooks = family.export_hooks()
    buckets = hooks.plan(spec, options, adapter, req.keeps, req.tokens, req.family_options)
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
        result = _build(req, adapter, hooks, spec, options, buckets, target, needs_text, tmp, steps)
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


def check_family_options(family, given: dict, model: str) -> None:
    """A family-only option given for a model of another family is refused in one line, before the weights load."""
    from vlmprune.models.registry import families

    mine = {o.dest: o for o in family.options}
    for dest, value in given.items():
        if value in (None, [], ()):
            continue
        if dest in mine:
            if isinstance(value, str):  # a flag several families declare: the model's family parses it (cli.py)
                given[dest] = mine[dest].parse_value(value)
            continue
        owners = [f.name for f in families().values() if any(o.dest == dest for o in f.options)]
        flag = next((o.flag for f in families().values() for o in f.options if o.dest == dest), dest)
        raise VlmpruneError(f"{flag} is an option of {' and '.join(owners) or 'another family'} models, and {model} "
                            f"is {family.name}", f"leave out {flag}")


def _build(req, adapter, hooks, spec, options, buckets: list[Bucket], target, needs_text, tmp: Path, steps: Steps):
    """Each artifact is exported straight to files, validated, and released before the next one starts, so export
    memory is bounded by the largest graph rather than by the whole bundle."""
    scratch = tmp / ".scratch"  # torch's per-tensor files land here; removed before the manifest is written
    scratch.mkdir()
    checks: list = []
    try:
        text_module, text_embeds, text_record, text_lint = None, None, None, {}
        if needs_text:
            text_module = TextEncoderGraph(adapter).eval()
            ids = adapter.clip.tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"]
            text_embeds = text_module(ids)
        vision_records, lint = hooks.export_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp,
                                                   scratch, steps, checks)
        if text_module is not None:
            text_record, text_lint = export_text_encoder(req, adapter, text_module, target, tmp, scratch, steps, checks)
            lint.update(text_lint)
        _release_vision(adapter)  # the decoder stage does not need the vision tower: give its memory back
        decoder_record, decoder_lint, decoder_summary = export_decoder(req, adapter, hooks, target, tmp, scratch,
                                                                       steps, checks)
        lint.update(decoder_lint)
        export_fused_decoder.skipped_reason = None
        fused_record, fused_summary = export_fused_decoder(req, adapter, tmp, steps, checks)  # for ORT CPU/CUDA
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with steps.step("write tokenizer"):
        adapter.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        if needs_text:
            adapter.clip.tokenizer.backend_tokenizer.save(str(tmp / "clip_tokenizer.json"))

    validation = None
    if req.validate:
        validation = summarise(checks, req.precision, decoder_summary)
        validation["decoder_fused"] = fused_summary
        (tmp / "validation.json").write_text(json.dumps(validation, indent=2) + "\n")
        _print_validation(validation, steps)
        if decoder_summary is not None:
            d = decoder_summary
            steps.log(f"  decoder ({d['precision']}) vs fp32 PyTorch: logits cosine >= {d['logits_min_cosine']:.5f}, "
                      f"greedy identical for {d['greedy_identical_prefix']}/{d['greedy_tokens']} tokens, "
                      f"teacher-forced agreement {d['teacher_forced_agreement']:.2f}")
        if not validation["passed"]:
            failed = [c for c in validation["checks"] if not c["passed"]]
            c = failed[0]
            raise VlmpruneError(
                f"validation failed for {len(failed)} check(s), first: {c['graph']} {c['case']} {c['output']} "
                f"({c['max_abs_diff']:.3g} > allowed {c['allowed']:.3g}, overlap {c['index_overlap']})",
                "no bundle was published; report this with the model and method",
            )

    manifest = _manifest(req, adapter, spec, options, target, vision_records, text_record, decoder_record, lint,
                         validation, tmp)
    if fused_record is not None:  # the standard-op "decoder" stays the TensorRT one; see decoder_fused.providers
        manifest["decoder_fused"] = fused_record
    elif export_fused_decoder.skipped_reason:  # prune-run says this, not a guess, when the fused decoder is missing
        manifest["decoder_fused_skipped"] = export_fused_decoder.skipped_reason
    hooks.manifest_extras(manifest, adapter, spec, tmp)
    write_manifest(tmp, manifest)
    return ExportResult(tmp, manifest, validation, dict(steps.timings))


def _check_lint(name: str, per_target: dict, target) -> None:
    t = per_target[target.name]
    if not t["ok"]:
        first = next(f for f in t["findings"] if f["level"] == "error")
        raise VlmpruneError(f"{name} fails the {target.name} lint: {first['message']}", "report this as a bug")


def _clear(scratch: Path) -> None:
    for p in scratch.iterdir():
        p.unlink()


def _finish_graph(model: onnx.ModelProto, file: str, tmp: Path, scratch: Path, weights: WeightsFile, target,
                  lint: dict) -> tuple[list[dict], list[dict]]:
    """What every family's bucket export does once a vision graph is traced with its weights in the shared weights
    file: lint it for every TensorRT target (refusing one the export's target cannot load), save it into the
    bundle, clear the scratch files and flush the weights. Returns its inputs and outputs for the manifest."""
    lint[file] = lint_all_targets(model)
    _check_lint(file, lint[file], target)
    save_graph(model, tmp / file)
    inputs, outputs = _io(model)
    _clear(scratch)
    weights.flush()
    return inputs, outputs


def _export_streamed(module, args, path: Path, weights: WeightsFile, *, input_names, output_names, opset,
                     dynamic_axes=None) -> onnx.ModelProto:
    """Trace with the weights as graph inputs, fold the shape chains (which never read a weight), then stream each
    weight from the module into ``weights``. The graph never holds its weights in memory, so a vision tower costs
    its own size once during export (ViT-L: 1.2 GB), not four protobuf copies of it."""
    model = export_onnx(module, args, path, input_names=input_names, output_names=output_names,
                        dynamic_axes=dynamic_axes, opset=opset, weights_as_inputs=True)
    model = _fold(model)
    attach_weights(model, {**dict(module.named_buffers()), **dict(module.named_parameters())}, weights)
    extra = [i.name for i in model.graph.input if i.name not in input_names]
    if extra:
        raise VlmpruneError(f"{path.name}: {len(extra)} graph input(s) are not weights of the model, first {extra[0]}",
                            "report this as a bug")
    weights.add_model(model)  # constants that folding produced above the inline threshold
    _trim()
    return model


def _trim() -> None:
    """Give freed heap memory back to the OS between graphs. glibc keeps freed blocks below its (dynamic, up to
    32 MB) mmap threshold in the heap, so without this the freed protobufs of one graph stay in RSS under the next."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def export_text_encoder(req, adapter, module, target, tmp: Path, scratch: Path, steps: Steps,
                        checks: list) -> tuple[dict, dict]:
    with steps.step("export CLIP text encoder"):
        ids = adapter.clip.tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"]
        with WeightsFile(tmp / "text_encoder.weights") as weights:
            model = _export_streamed(module, (ids,), scratch / "text_encoder.onnx", weights,
                                     input_names=["input_ids"], output_names=["text_embeds"],
                                     dynamic_axes={"input_ids": {1: "text_length"}}, opset=target.opset)
        lint = {"text_encoder.onnx": lint_all_targets(model)}
        _check_lint("text_encoder.onnx", lint["text_encoder.onnx"], target)
        save_graph(model, tmp / "text_encoder.onnx")
        t_in, t_out = _io(model)
        _clear(scratch)
    if req.validate:
        with steps.step("validate text_encoder.onnx"):
            checks += validate_text_encoder(tmp, "text_encoder.onnx", module, ids)
    record = {"file": "text_encoder.onnx", "weights": "text_encoder.weights", "inputs": t_in, "outputs": t_out,
              "tokenizer": "clip_tokenizer.json", "max_length": adapter.clip.max_length,
              "projection_dim": adapter.clip.projection_dim}
    return record, lint


def _drop_checkpoint_pages() -> None:
    """Let the kernel drop the resident pages of the memory-mapped checkpoint shards (transformers maps safetensors
    and uses the mapping as the weights when the dtype matches). Tracing touched every page, so without this the
    whole decoder stays in this process's RSS while validation maps the exported copy too: 13.5 GB twice for a 7B
    model. The mappings are private and the weights are never written, so MADV_DONTNEED only discards clean pages,
    which read back from the file (the page cache) when the fp32 reference next needs them. Linux only."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in maps:
        fields = line.split()
        if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", 4))


def _release_vision(adapter) -> None:
    """Drop the vision side's weights (its graphs are written and validated): the submodules the family declares."""
    for part in adapter.family.vision_modules:
        try:
            module = adapter.model.get_submodule(part)
        except AttributeError:
            continue
        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype)
    _trim()


def export_decoder(req, adapter, hooks, target, tmp: Path, scratch: Path, steps: Steps,
                   checks: list) -> tuple[dict, dict, dict | None]:
    """The KV-cache decoder in its precision: fp32/fp16 as traced, int8/int4 weight-only (MatMulNBits). The
    family's hooks give its module; its declaration, the I/O name templates and the position rank."""
    precision = req.decoder_precision
    decoder, io = hooks.decoder_module(adapter), adapter.family.decoder_io
    dtype = next(decoder.lm.parameters()).dtype
    float_name = "float16" if dtype == torch.float16 else "float32"
    text = adapter.text
    quantization = None
    with steps.step(f"export decoder ({precision})"):
        names_in, names_out, kinds, axes = decoder_io(io, text.num_layers, decoder.extra_inputs)
        model = export_onnx(decoder, decoder.example_inputs(dtype=dtype), scratch / "decoder.onnx",
                            input_names=names_in, output_names=names_out,
                            dynamic_axes=axes, opset=target.opset,
                            weights_as_inputs=True)
        params = dict(decoder.named_parameters())
        if precision in BITS:  # float weights go to scratch; the quantizer reads them from there one at a time
            with WeightsFile(scratch / "float.weights") as floats:
                attach_weights(model, params, floats)
        with WeightsFile(tmp / "decoder.weights") as weights:
            if precision in BITS:
                quantization = quantize_decoder(model, scratch, weights, precision, steps.log)
            else:
                attach_weights(model, params, weights)
            weights.add_model(model, scratch)
        _clear(scratch)
        lint = {}
        if quantization is None:  # MatMulNBits is for ONNX Runtime: an int8/int4 decoder is not a TensorRT input
            lint["decoder.onnx"] = lint_all_targets(model)
            _check_lint("decoder.onnx", lint["decoder.onnx"], target)
        save_graph(model, tmp / "decoder.onnx")
        dec_in, dec_out = _io(model, kinds)
        del model
        np.save(tmp / "embed_tokens.npy", adapter.embedding_table().detach().numpy())
        _trim()
        _drop_checkpoint_pages()
    summary = None
    if req.validate:
        with steps.step(f"validate decoder.onnx ({precision}, {GREEDY_TOKENS} greedy tokens against fp32 PyTorch)"):
            prompt_ids = adapter.tokenizer(VALIDATION_PROMPT)["input_ids"]
            io_names = DecoderNames.of({"inputs": dec_in, "outputs": dec_out, "num_layers": text.num_layers})
            found, summary = validate_decoder(tmp, "decoder.onnx", decoder, adapter, precision, prompt_ids,
                                              io=io_names)
            checks += found
    record = {
        "file": "decoder.onnx",
        "weights": "decoder.weights",
        "precision": precision,
        "activation_dtype": float_name,
        "kv_dtype": float_name,
        "fp32_outputs": ["logits"],  # the LM head's output is cast to fp32; RMSNorm and softmax compute in fp32
        "quantization": quantization,
        "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"] if quantization else None,
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
        "embeddings": {"file": "embed_tokens.npy", "shape": [text.vocab_size, text.hidden_size], "dtype": float_name},
    }
    return record, lint, summary


_DECODER_SUMMARY_CHECKS = ("logits cosine", "identical prefix", "teacher-forced agreement")


def _print_validation(validation: dict, steps: Steps) -> None:
    by_graph: dict[str, list] = {}
    for c in validation["checks"]:
        by_graph.setdefault(c["graph"], []).append(c)
    for graph, checks in by_graph.items():
        # greedy and cosine checks carry their own units (printed in the decoder line)
        worst = max((c["max_abs_diff"] for c in checks if c["output"] not in _DECODER_SUMMARY_CHECKS), default=0.0)
        idx = [c for c in checks if c["output"] == "kept_indices"]
        extra = f", kept indices identical in {sum(bool(c['indices_equal']) for c in idx)}/{len(idx)}" if idx else ""
        floor = validation.get("tolerance", {}).get("min_overlap", 1.0)
        if idx and floor < 1.0:  # fp16 passes on set overlap: print the figure that made it pass, and the bar
            extra += f", index overlap min {min(c['index_overlap'] for c in idx):.3f} (needs >= {floor})"
        status = "ok" if all(c["passed"] for c in checks) else "FAILED"
        steps.log(f"  {status:6s} {graph}: max abs diff {worst:.2e}{extra}")


def _manifest(req, adapter, spec, options, target, vision_records, text_record, decoder_record, lint, validation,
              folder):
    view = adapter.vision.views[0]
    from vlmprune.models.presets import PRESETS

    text = adapter.text
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "family": adapter.family.family_key,  # the runtime picks the family's hooks by this, once
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
            # every view the graphs take (anyres: the base view, then the crops), and the layers that stay fp32 in
            # reduced-precision engines (prune-build) and unquantised (prune-calibrate), as the family declares them
            "views": [{"name": v.name, "image_size": list(v.image_size), "grid": list(v.grid),
                       "num_patches": v.num_patches, "has_cls": v.has_cls} for v in adapter.vision.views],
            "fp32_scopes": list(adapter.family.fp32_scopes),
            # substrings of node names prune-calibrate also leaves in floating point: the scoring layer's attention
            "int8_float_scopes": [adapter.family.scoring_attention_scope.format(layer=adapter.vision.layers_run - 1)],
            "weights": "vision.weights",
            "buckets": vision_records,
        },
        "text_encoder": text_record,
        "prompt": {
            "tokenizer": "tokenizer.json",
            "chat_template": text.chat_template,
            "image_token": text.image_token,
            "image_token_id": text.image_token_id,
            "stitch": "replace_placeholder",  # the single image token is replaced by the K kept image tokens
            "positions": adapter.family.positions_for(spec.name),  # the method's default for this family
        },
        "decoder": decoder_record,
        "lint": lint,
        "validation": None if validation is None else {"file": "validation.json", "passed": validation["passed"],
                                                       "checks": len(validation["checks"])},
    }
    return manifest
