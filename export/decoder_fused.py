"""The fused decoder for ONNX Runtime, next to the standard-op ``decoder.onnx`` that TensorRT needs.

Producer: ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``) on the checkpoint's own language
model, with the embedding left out (``exclude_embeds``: the graph takes ``inputs_embeds``, so stitched image tokens
go straight in) and the LM head computing the last position only (``prune_lm_head``). Its graph has
GroupQueryAttention with rotary inside, one past/present KV buffer per layer that the runtime allocates at the
context length and binds in place, SkipSimplifiedLayerNormalization and packed QKV projections.

What is done here rather than by the builder, and why:
- The builder loads weights with ``from_pretrained`` from a Llama folder, which would be a second copy of the decoder
  next to the exporter's. It is handed the exporter's own language-model modules instead (a subclass whose
  ``load_weights`` returns them; the module tree is copied, the tensors are shared). It still reads ``config.json``
  (the checkpoint's ``text_config``) and the tokenizer from a small folder written here.
- int8/int4: the builder's own path turns its whole graph into one fp32 ModelProto before quantising (27 GB for a 7B
  decoder). The builder writes the fp32 graph instead (streamed to disk tensor by tensor) and ``quantize`` (the plain
  decoder's) quantises it one MatMul at a time with ONNX Runtime's same quantiser (MatMulNBits, block 32,
  symmetric, accuracy level 4: the builder's CPU defaults), so the result is the builder's own int8/int4 graph.
- fp16 is built for the CUDA provider (the builder's valid fp16 target; its CPU table has no fp16 GroupQueryAttention).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import standard_kind, with_kinds

from .onnx_io import WeightsFile, save_graph
from .quantize import BITS, quantize_decoder

FILE = "decoder_fused.onnx"
WEIGHTS = "decoder_fused.weights"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# decoder precision -> (builder precision, builder execution provider); int8/int4 are quantised from fp32 afterwards
_BUILD = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda"), "int8": ("fp32", "cpu"), "int4": ("fp32", "cpu")}
# The providers the runtime uses it on (others get decoder.onnx). GroupQueryAttention has CUDA kernels for fp16/bf16
# only (the builder's own table), so an fp32-activation graph would fall back to CPU nodes there; and ONNX Runtime
# CPU has no fp16 MatMul on x86, so an fp16 graph there runs on fp32 copies of its weights (it is validated on CPU
# all the same, one weight at a time).
PROVIDERS = {"fp32": ["CPUExecutionProvider"], "fp16": ["CUDAExecutionProvider"], "int8": ["CPUExecutionProvider"],
             "int4": ["CPUExecutionProvider"]}
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaModel"), "mistral": ("MistralForCausalLM", "MistralModel")}
# exclude_embeds: the graph takes inputs_embeds; prune_lm_head: logits of the last position only. Not
# fuse_mlp_gate_up: one MatMul for gate and up took 3-5 % off a bench-llava step, but the builder holds a
# concatenated copy of every gate/up weight until it writes the file (5.8 GB for LLaVA-1.5-7B in fp16), on top of
# the packed QKV copies it already holds (3.2 GB).
BUILDER_OPTIONS = {"exclude_embeds": "true", "prune_lm_head": "true"}


def builder_available() -> bool:
    try:
        import onnxruntime_genai.models.builder  # noqa: F401
    except ImportError:
        return False
    return True


def export_fused_decoder(req, adapter, folder: Path, steps, checks: list) -> tuple[dict | None, dict | None]:
    """The bundle's fused-decoder artifact: built at the request's decoder precision and validated against fp32
    PyTorch (its checks appended to ``checks``). Returns the manifest record and the summary for validation.json,
    or ``(None, None)`` when it is not made.

    ``req.fused_decoder``: True makes it (or fails saying why), False skips it, None (the default) makes it when
    ONNX Runtime GenAI is installed and the language model is one its builder knows, and says so when not. Why it
    was not made is kept in ``skipped_reason`` for the manifest, so the runtime can say the real reason."""
    wanted = getattr(req, "fused_decoder", None)
    if wanted is False:
        export_fused_decoder.skipped_reason = "exported with --no-fused-decoder"
        return None, None
    if wanted is None:
        model_type = getattr(adapter.model.config.text_config, "model_type", "")
        missing = dict(adapter.family.missing_decoders).get("fused")
        reason = ("onnxruntime-genai was not installed where it was exported" if not builder_available()
                  else missing if missing else None if model_type in _ARCHITECTURES
                  else f"ONNX Runtime GenAI's builder does not know {model_type!r} models")
        if reason:
            export_fused_decoder.skipped_reason = reason
            steps.log(f"fused decoder skipped: {reason}; the bundle has the plain decoder only")
            return None, None
    precision = req.decoder_precision or "fp32"
    with steps.step(f"export fused decoder ({precision}, ONNX Runtime GenAI model builder)"):
        record = build_fused_decoder(adapter, folder, precision)
    summary = None
    if req.validate:
        from .decoder import DecoderGraph
        from .exporter import VALIDATION_PROMPT
        from .validate import GREEDY_TOKENS, validate_fused_decoder

        with steps.step(f"validate {FILE} ({precision}, {GREEDY_TOKENS} greedy tokens against fp32 PyTorch)"):
            prompt_ids = adapter.tokenizer(VALIDATION_PROMPT)["input_ids"]
            found, summary = validate_fused_decoder(folder, record, DecoderGraph(adapter).eval(), adapter, prompt_ids)
            checks += found
    return record, summary


def build_fused_decoder(adapter, folder: Path, precision: str = "fp32") -> dict:
    """Write ``decoder_fused.onnx`` + ``decoder_fused.weights`` into ``folder``; return the manifest record."""
    if precision not in PRECISIONS:
        raise VlmpruneError(f"unknown decoder precision {precision!r} for the fused decoder",
                            f"use one of {', '.join(PRECISIONS)}")
    if not builder_available():
        raise VlmpruneError("the fused decoder needs ONNX Runtime GenAI's model builder, which is not installed",
                            "pip install onnxruntime-genai, or export with --no-fused-decoder")
    build_precision, ep = _BUILD[precision]
    built = Path(tempfile.mkdtemp(prefix=".fused-decoder-", dir=folder))
    try:
        run_builder(adapter, built, build_precision, ep, {**BUILDER_OPTIONS, "filename": FILE})
        quantization = None
        if precision in BITS:  # one MatMul at a time, with the plain decoder's quantiser (ORT's MatMulNBits)
            model = onnx.load(str(built / FILE), load_external_data=False)
            with WeightsFile(folder / WEIGHTS) as weights:
                quantization = quantize_decoder(model, built, weights, precision)
                weights.add_model(model, built)
            save_graph(model, folder / FILE)
        else:
            _relocate(built / FILE, built / f"{FILE}.data", folder, FILE, WEIGHTS)
        producer = {
            "name": "onnxruntime-genai model builder",
            "version": _genai_version(),
            "precision": build_precision,
            "execution_provider": ep,
            "extra_options": dict(BUILDER_OPTIONS),
        }
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return _record(folder, adapter, precision, producer, quantization)


def _genai_version() -> str:
    import onnxruntime_genai

    return getattr(onnxruntime_genai, "__version__", "unknown")


def _builder_source(adapter, folder: Path, model_type: str) -> Path:
    """The folder the builder reads its configuration from: the language model's config as a causal LM, and the
    tokenizer (it reads special tokens from it). No weights: those come from memory."""
    folder.mkdir(parents=True)
    config = adapter.model.config.text_config.to_dict()
    config["architectures"] = [_ARCHITECTURES[model_type][0]]
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    adapter.tokenizer.save_pretrained(str(folder))
    return folder


def _causal_lm_view(adapter):
    """``model`` + ``lm_head`` laid out like a ``*ForCausalLM``, as the builder walks it. The module objects are
    copied (the builder may reassign submodules, which must not touch the exporter's model); parameters and
    buffers are shared, not copied."""
    import torch

    view = torch.nn.Module()
    view.model = adapter.language_model()
    view.lm_head = adapter.lm_head()
    memo = {id(t): t for t in [*view.parameters(), *view.buffers()]}
    return copy.deepcopy(view, memo)


def run_builder(adapter, out: Path, precision: str, ep: str, options: dict[str, str]) -> Path:
    """Run ONNX Runtime GenAI's model builder on the adapter's language model (in memory) into ``out``, which
    then holds what the builder writes: the graph, its ``.data``, ``genai_config.json`` and the tokenizer."""
    import torch

    model_type = getattr(adapter.model.config.text_config, "model_type", "")
    if model_type not in _ARCHITECTURES:
        raise VlmpruneError(f"ONNX Runtime GenAI's builder path supports Llama and Mistral language models, "
                            f"not {model_type!r}", "export with --no-fused-decoder")
    work = Path(tempfile.mkdtemp(prefix=".builder-", dir=out.parent))
    view = _causal_lm_view(adapter)
    log = io.StringIO()
    quant_logger = logging.getLogger("onnxruntime.quantization")
    saved_level = quant_logger.level
    try:
        source = _builder_source(adapter, work / "source", model_type)
        # The builder prints per layer and per tensor; our step lines report progress instead.
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import onnxruntime_genai.models.builder as builder

            base = getattr(builder, _ARCHITECTURES[model_type][1])

            class InMemory(base):
                def load_weights(self, input_path):
                    return view

            extra = builder.parse_extra_options(None, str(source), str(out), precision, ep, str(work / "cache"),
                                                [f"{k}={v}" for k, v in options.items()])
            quant_logger.setLevel(logging.WARNING)
            with torch.no_grad(), _patched(builder, _ARCHITECTURES[model_type][1], InMemory):
                builder.create_model(None, str(source), str(out), precision, ep, str(work / "cache"), **extra)
    except Exception as exc:
        tail = " | ".join(line.strip() for line in log.getvalue().splitlines()[-3:] if line.strip())
        raise VlmpruneError(f"ONNX Runtime GenAI's model builder failed on this model: {exc!s:.300} ({tail[-300:]})",
                            "export with --no-fused-decoder (the plain decoder is unaffected), or report this") from exc
    finally:
        quant_logger.setLevel(saved_level)
        shutil.rmtree(work, ignore_errors=True)
    filename = options.get("filename", "model.onnx")
    if not (out / filename).exists():
        raise VlmpruneError(f"the model builder wrote no {filename}", "export with --no-fused-decoder, or report this")
    return out


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _relocate(model_path: Path, data_path: Path, folder: Path, file: str, weights: str) -> None:
    """Move the builder's graph and its one external data file into the bundle under the bundle's names."""
    os.replace(data_path, folder / weights)
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = weights
    onnx.save_model(model, str(folder / file))


def _describe(value_info) -> dict:
    tt = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
    return {"name": value_info.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}


def _record(folder: Path, adapter, precision: str, producer: dict, quantization: dict | None) -> dict:
    model = onnx.load(str(folder / FILE), load_external_data=False)
    inputs = [_describe(v) for v in model.graph.input]
    outputs = [_describe(v) for v in model.graph.output]
    dtype = {v["name"]: v["dtype"] for v in inputs + outputs}
    text = adapter.text
    names = {v["name"] for v in inputs}
    expected = {"inputs_embeds", "attention_mask", "past_key_values.0.key"}
    # the builder writes the standard names (graph_io.standard_kind): their kinds go into the manifest
    kinds = {name: standard_kind(name) for name in dtype}
    if not expected <= names or "logits" not in dtype or None in kinds.values():
        raise VlmpruneError(f"the model builder wrote a graph with inputs {sorted(names)[:5]}, not the expected ones",
                            "export with --no-fused-decoder, or report this")
    inputs, outputs = with_kinds(inputs, kinds), with_kinds(outputs, kinds)
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "file": FILE,
        "weights": WEIGHTS,
        "precision": precision,
        "producer": producer,
        "quantization": quantization,
        "inputs": inputs,
        "outputs": outputs,
        "embeds_dtype": dtype["inputs_embeds"],
        "kv_dtype": dtype["past_key_values.0.key"],
        "logits_dtype": dtype["logits"],
        "logits": "last_position",  # [B, 1, V] whatever the number of new tokens
        "num_layers": text.num_layers,
        "num_heads": text.num_heads,
        "num_kv_heads": text.num_kv_heads,
        "head_dim": text.head_dim,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        # One past/present buffer per layer and kind, [1, Hkv, buffer_length, Dh], bound as both the input and
        # the output: GroupQueryAttention writes the new tokens in place.
        "kv_cache": {"layout": "BNSH", "shared_past_present": True, "past": "past_key_values.{i}.key|value",
                     "present": "present.{i}.key|value"},
        "buffer_length": text.max_context,
        # The graph derives GroupQueryAttention's seqlens_k (= cache + new - 1) and total_sequence_length from an
        # all-ones attention_mask [1, cache + new]; positions are the cache positions (rotary inside attention).
        "sequence_inputs": ["attention_mask"],
        "positions": "contiguous",
        "providers": list(PROVIDERS[precision]),
        # the builder's graph needs a recent ONNX Runtime; an older one cannot load it and the runtime falls back
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
    }
