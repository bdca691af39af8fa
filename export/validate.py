"""Validation after export (as optimum does): every written ONNX graph in ONNX Runtime against the PyTorch modules.

Vision buckets on an image the tool makes and on random input: max abs difference of ``image_embeds`` within the
tolerance and identical kept indices in fp32 (set overlap reported, and required above a floor, in fp16). The text
encoder on a prompt. The decoder's logits and presents for a prefill and a second step with the cache.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmprune import graph_io
from vlmprune.graph_io import DecoderNames

_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32}

# |ort - torch| <= ATOL + RTOL * max|torch|, per output.
TOLERANCE = {"fp32": {"atol": 1e-4, "rtol": 1e-4, "min_overlap": 1.0}, "fp16": {"atol": 2e-2, "rtol": 2e-2, "min_overlap": 0.9}}


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    allowed: float
    passed: bool
    index_overlap: float | None = None
    indices_equal: bool | None = None


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(graph, case, name, ref: np.ndarray, got: np.ndarray, tol) -> Check:
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    allowed = tol["atol"] + tol["rtol"] * float(np.max(np.abs(ref))) if ref.size else tol["atol"]
    return Check(graph, case, name, diff, allowed, bool(diff <= allowed and np.isfinite(diff)))


def _indices(graph, case, ref: np.ndarray, got: np.ndarray, tol) -> Check:
    ref_set, got_set = set(ref.reshape(-1).tolist()), set(got.reshape(-1).tolist())
    overlap = len(ref_set & got_set) / max(1, len(ref_set))
    equal = bool(np.array_equal(ref, got))
    passed = equal if tol["min_overlap"] >= 1.0 else overlap >= tol["min_overlap"]
    return Check(graph, case, "kept_indices", 0.0, 0.0, passed, overlap, equal)


def validate_text_encoder(folder: Path, file: str, module, input_ids: torch.Tensor) -> list[Check]:
    sess = _session(folder / file)
    with torch.no_grad():
        ref = module(input_ids).numpy()
    got = sess.run(["text_embeds"], {"input_ids": input_ids.numpy()})[0]
    return [_compare(file, "prompt", "text_embeds", ref, got, TOLERANCE["fp32"])]


# Decoder checks per decoder precision, always against the fp32 PyTorch decoder. Logits: |ort - torch| <= atol +
# rtol * max|torch|, and the cosine of every step's logits; greedy: the number of tokens decoded before the first step
# whose argmax differs from fp32 PyTorch's (``min_greedy_prefix``), and the fraction of steps whose argmax agrees
# (``min_teacher_forced``). The int8/int4 floors come from random-weight checkpoints, the worst case for weight
# quantization (flat logits over 32000 tokens, no outlier structure): on the TinyLLaVA-1.1B-geometry fixture a correct
# int4 decoder measured cosine 0.893 and agreement 0.125, int8 0.9991 and 0.906; the broken graphs met while building
# this measured cosine 0.38-0.44, which the cosine floors reject. The measured figures go beside the floors into
# validation.json.
DECODER_TOLERANCE = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99999, "min_greedy_prefix": 32, "min_teacher_forced": 1.0},
    "fp16": {"atol": 5e-2, "rtol": 5e-2, "min_cosine": 0.999, "min_greedy_prefix": 4, "min_teacher_forced": 0.8},
    "int8": {"atol": 2e-1, "rtol": 2e-1, "min_cosine": 0.995, "min_greedy_prefix": 1, "min_teacher_forced": 0.6},
    "int4": {"atol": 1.0, "rtol": 1.0, "min_cosine": 0.85, "min_greedy_prefix": 0, "min_teacher_forced": 0.05},
}
GREEDY_TOKENS = 32


@contextlib.contextmanager
def fp32_reference(decoder):
    """Run a half-precision decoder as fp32 PyTorch, one block at a time: each block's weights are upcast just
    before it runs and the original (memory-mapped) tensors put back right after, so the reference never needs an
    fp32 copy of the whole decoder (27 GB for a 7B model)."""
    lm, head = decoder.lm, decoder.head
    blocks = [*lm.layers, lm.norm, head]
    if all(p.dtype == torch.float32 for p in decoder.parameters()):
        yield
        return
    saved, hooks = {}, []

    def up(module, args, kwargs=None):
        saved[id(module)] = [(p, p.data) for p in module.parameters()]
        for p in module.parameters():
            p.data = p.data.float()

    def down(module, args, out, kwargs=None):
        for p, data in saved.pop(id(module)):
            p.data = data

    try:
        for block in blocks:
            hooks.append(block.register_forward_pre_hook(up))
            hooks.append(block.register_forward_hook(down))
        yield
    finally:
        for h in hooks:
            h.remove()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.min(num / np.maximum(den, 1e-30)))


def _decoder_session(path: Path, half: bool):
    """ONNX Runtime CPU has no fp16 MatMul on x86: at load it casts every fp16 weight to an fp32 copy (4.4 GB for
    a 2 GB decoder). Validation of a half-precision decoder therefore runs unoptimised and without the memory arena,
    so each weight is cast while its node runs and freed after it: slower, but the weights stay memory-mapped.
    Only for fp16 decoders: int8/int4 weights are small, and ONNX Runtime 1.31's unoptimised fp16 MatMulNBits path
    computes wrong values on CPU (max |diff| 2.4 against 0.065 optimised, on tiny-llava), which this would hide."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if half:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_greedy(sess, io: DecoderNames, prompt: np.ndarray, table,
                tokens: int) -> tuple[list[np.ndarray], list[int]]:
    """Greedy decoding in ONNX Runtime with its own KV cache, fed as the runtime feeds it (by the names ``io`` that go
    into the manifest). Returns the prefill's logits (every position) followed by one row per step, and the tokens
    chosen."""
    types = {i.name: i for i in sess.get_inputs()}
    float_t = np.float16 if types[io.inputs_embeds].type == "tensor(float16)" else np.float32
    kv_input = types[io.past[0]]
    rank = io.position_rank
    kv_t = np.float16 if kv_input.type == "tensor(float16)" else np.float32
    cache = [np.zeros((1, kv_input.shape[1], 0, kv_input.shape[3]), kv_t) for _ in io.past]
    outputs = [io.logits, *io.present]
    logits_rows, path, length, x = [], [], 0, prompt
    for _ in range(tokens):
        seq = x.shape[1]
        positions = np.arange(length, length + seq, dtype=np.int64)[None]
        if rank == 3:  # M-RoPE (Qwen2.5-VL): a text-only prompt has the same position on all three axes
            positions = np.ascontiguousarray(np.broadcast_to(positions, (3, 1, seq)))
        feeds = dict(zip([io.inputs_embeds, io.attention_mask, io.position_ids, *io.past],
                         [x.astype(float_t), np.ones((1, length + seq), np.int64), positions, *cache]))
        for name in set(types) - set(feeds):  # a family's prefill-only inputs (DeepStack): a text prompt has none
            feeds[name] = graph_io.empty_value({"shape": types[name].shape}, _ORT_NP[types[name].type])
        out = sess.run(outputs, feeds)
        cache, length = out[1:], length + seq
        logits = out[0][0].astype(np.float32)
        logits_rows.append(logits)
        path.append(int(logits[-1].argmax()))
        x = np.asarray(table[[path[-1]]], np.float32)[None]
    return logits_rows, path


def validate_decoder(folder: Path, file: str, module, adapter, precision: str, prompt_ids: list[int],
                     tokens: int = GREEDY_TOKENS, greedy=None, io: DecoderNames | None = None
                     ) -> tuple[list[Check], dict]:
    """The exported decoder against the fp32 PyTorch decoder on the validation prompt.

    ONNX Runtime decodes ``tokens`` tokens greedily with its KV cache; then fp32 PyTorch reads the prompt followed by
    those tokens in one pass (one upcast of each block, see ``fp32_reference``) and gives the logits at every
    position. Both saw identical inputs up to each step, so per step: the logits difference and cosine, whether
    PyTorch's argmax is ONNX Runtime's token (the agreement), and the first step where it is not, which is where
    free-running greedy decoding of the two would first diverge.

    ``greedy(prompt, table, tokens) -> (rows, path)`` replaces the session's decoding (the fused decoder's runner,
    whose prefill row holds the last position only); ``io``: the graph's names as the manifest will record them."""
    tol = DECODER_TOLERANCE[precision]
    table = adapter.embedding_table().detach()
    prompt = table[torch.as_tensor(prompt_ids)].float().unsqueeze(0)
    if greedy is None:
        sess = _decoder_session(folder / file, half=precision == "fp16")
        greedy = functools.partial(_ort_greedy, sess, io)
    rows, path = greedy(prompt.numpy(), table.float().numpy() if table.dtype != torch.float16 else table.numpy(),
                        tokens)
    greedy = sess = None
    ids = list(prompt_ids) + path[:-1]
    x = table[torch.as_tensor(ids)].float().unsqueeze(0)
    past = [torch.zeros(1, adapter.text.num_kv_heads, 0, adapter.text.head_dim)
            for _ in range(2 * adapter.text.num_layers)]
    with torch.no_grad(), fp32_reference(module):
        ref = module(x, torch.ones(1, len(ids), dtype=torch.int64), torch.arange(len(ids)).unsqueeze(0), *past)[0]
    ref = ref[0].float().numpy()
    n = len(prompt_ids)
    ref_rows = [ref[n - len(rows[0]):n]] + [ref[n - 1 + i: n + i] for i in range(1, tokens)]
    checks = [_compare(file, "prefill", "logits", ref_rows[0], rows[0], tol),
              _compare(file, "steps with cache", "logits", np.concatenate(ref_rows[1:]),
                       np.concatenate(rows[1:]), tol)]
    ref_tokens = [int(r[-1].argmax()) for r in ref_rows]
    agree = [a == b for a, b in zip(ref_tokens, path)]
    prefix = agree.index(False) if False in agree else tokens
    agreement = sum(agree) / tokens
    cosines = [_cosine(r, o) for r, o in zip(ref_rows, rows)]
    min_cos = float(min(cosines))
    need_prefix = min(tol["min_greedy_prefix"], tokens)
    checks.append(Check(file, f"{tokens} steps", "logits cosine", 1.0 - min_cos, 1.0 - tol["min_cosine"],
                        min_cos >= tol["min_cosine"]))
    checks.append(Check(file, f"greedy {tokens} tokens", "identical prefix", float(tokens - prefix),
                        float(tokens - need_prefix), prefix >= need_prefix))
    checks.append(Check(file, f"greedy {tokens} tokens", "teacher-forced agreement", 1.0 - agreement,
                        1.0 - tol["min_teacher_forced"], agreement >= tol["min_teacher_forced"]))
    diffs = [float(np.max(np.abs(r.astype(np.float64) - o))) for r, o in zip(ref_rows, rows)]
    summary = {
        "precision": precision,
        "tolerance": tol,
        "logits_max_abs_diff": {"prefill": diffs[0], "cached_steps_max": max(diffs[1:])},
        "logits_min_cosine": min_cos,
        "greedy_tokens": tokens,
        "greedy_identical_prefix": prefix,
        "first_divergence": None if prefix == tokens else prefix,
        "teacher_forced_agreement": agreement,
        "reference": "fp32 PyTorch (transformers) decoder on the prompt and ONNX Runtime's greedy tokens",
    }
    return checks, summary


def summarise(checks: list[Check], precision: str, decoder: dict | None = None) -> dict:
    return {
        "precision": precision,
        "tolerance": TOLERANCE[precision],
        "passed": all(c.passed for c in checks),
        "decoder": decoder,
        "checks": [asdict(c) for c in checks],
    }


def validate_fused_decoder(folder: Path, record: dict, module, adapter, prompt_ids: list[int],
                           tokens: int = GREEDY_TOKENS) -> tuple[list[Check], dict]:
    """The fused decoder checked as ``validate_decoder`` checks ``decoder.onnx`` (same floors at its precision), run
    the way the runtime runs it: ``FusedDecoder`` (I/O binding, the in-place KV buffer, last-position logits)."""
    from types import SimpleNamespace

    from vlmprune.runtime.fused_decoder import FusedDecoder

    sess = _decoder_session(folder / record["file"], half=record["kv_dtype"] == "float16")
    types = {i.name: np.float16 if i.type == "tensor(float16)" else np.int64 if i.type == "tensor(int64)" else
             np.float32 for i in sess.get_inputs()}
    backend = SimpleNamespace(session=sess, inputs=types, outputs=[o.name for o in sess.get_outputs()],
                              providers=["CPUExecutionProvider"])
    decoder = FusedDecoder(backend, record, capacity=len(prompt_ids) + tokens)

    def greedy(prompt: np.ndarray, table: np.ndarray, n: int):
        rows, path, x = [], [], prompt
        for _ in range(n):
            rows.append(decoder.step(x).astype(np.float32)[None])  # a copy: the runner reuses its logits buffer
            path.append(int(rows[-1][-1].argmax()))
            x = np.asarray(table[[path[-1]]], np.float32)[None]
        return rows, path

    checks, summary = validate_decoder(folder, record["file"], module, adapter, record["precision"], prompt_ids,
                                       tokens, greedy=greedy)
    summary["runner"] = "vlmprune.runtime.fused_decoder.FusedDecoder (in-place KV buffer, last-position logits)"
    return checks, summary
