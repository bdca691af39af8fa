"""Inference backends behind one interface (Polygraphy-style split): ONNX Runtime here, TensorRT in trt_backend.

A backend runs one graph: ``run(feeds) -> {name: array}``, and says its ``inputs``/``outputs`` with dtypes, which the
runtime reads rather than assumes (TensorRT 8.x narrows INT64 to INT32).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import FLOAT_DTYPES, PREFILL_INPUTS, DecoderNames, check_cache_pairing, empty_value

_PREFERRED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class Backend:
    name = "backend"
    inputs: dict[str, np.dtype]
    outputs: list[str]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cast_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v, dtype=self.inputs[k]) for k, v in feeds.items()}


def choose_providers(requested: str | None = None, available: list[str] | None = None) -> list[str]:
    """``available``: the providers to choose from (default: this ONNX Runtime's; ``--plan`` passes others)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested:
        name = requested if requested.endswith("ExecutionProvider") else f"{requested.capitalize()}ExecutionProvider"
        name = {"TrtExecutionProvider": "TensorrtExecutionProvider", "CudaExecutionProvider": "CUDAExecutionProvider",
                "CpuExecutionProvider": "CPUExecutionProvider"}.get(name, name)
        if name not in available:
            raise VlmpruneError(f"ONNX Runtime provider {requested!r} is not available here",
                                f"available: {', '.join(available)}")
        return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    return [p for p in _PREFERRED if p in available]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, provider: str | None = None, threads: int | None = None,
                 decoder_loop: bool = False, providers: list[str] | None = None,
                 provider_options: list[dict] | None = None):
        """``providers``/``provider_options``: this graph's own provider list (``stages.StagePlanner`` chooses per
        stage); default ``choose_providers(provider)``."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Several sessions (vision, text, decoder) share the cores: threads that spin after a run would steal them
        # from the next session (measured: the vision graph ran at half speed next to an idle decoder session).
        # ``decoder_loop``: a generation step is ~80 small kernels and the runtime's Python between two steps takes
        # ~20 us, so the decoder's threads spin rather than park (parked, bench-llava's fp32 step took 3.85 ms instead
        # of 2.64), but for 1 ms at most: ONNX Runtime's default spin lasts tens of ms after the last step and slowed
        # the next request's vision graph from 11.1 to 13.1 ms; with 1 ms, 11.2 ms and the same step time
        # (force_spinning_stop, which parks them at the end of every run, cost 3-8 %).
        # VLMPRUNE_SPIN=0 turns spinning off (on a machine shared with other busy processes spinning threads compete
        # with them: under a load average of 4 on 2 cores the step took twice as long spinning). Every step has a new
        # cache length, so no memory pattern is cached per shape (ONNX Runtime would plan and keep one per length).
        spin = decoder_loop and os.environ.get("VLMPRUNE_SPIN", "1") != "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:
            opts.add_session_config_entry("session.intra_op.spin_duration_us", "1000")
        if decoder_loop:
            opts.enable_mem_pattern = False
        threads = threads or int(os.environ.get("VLMPRUNE_THREADS", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = list(providers) if providers else choose_providers(provider)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=self.providers,
                                                provider_options=provider_options)
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise VlmpruneError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:200]}",
                                "re-export the bundle") from None
        # What the session really runs on: a GPU provider whose CUDA libraries fail to load is dropped with only a
        # log line, and the stage report must say so.
        self.providers = self.session.get_providers()
        self.file = Path(path).name
        self.path = Path(path)
        self.inputs = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        # every tensor's shape (ints and dimension names) and dtype, for ``check_io`` against the manifest
        args = self.session.get_inputs() + self.session.get_outputs()
        self.shapes = {a.name: list(a.shape) for a in args}
        self.types = {a.name: np.dtype(_ORT_TYPES[a.type]) for a in args if a.type in _ORT_TYPES}

    def run(self, feeds, outputs=None):
        names = outputs or self.outputs
        feeds = self.cast_feeds(feeds)
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:
            raise run_failure(self.file, exc) from None


def check_io(backend: Backend, record: dict, what: str) -> Backend:
    """The graph (or engine) behind ``backend`` has exactly the inputs and outputs its manifest ``record`` lists, with
    their ranks, static sizes and kinds of dtype (integer or floating point): a mismatch (a crafted manifest, a file
    from another export) is one line here, not a failure or a wrong answer inside a run."""
    listed_in = {e["name"] for e in record["inputs"]}
    problems = [f"has no input {n!r}" for n in sorted(listed_in - set(backend.inputs))]
    problems += [f"has an input {n!r} that the manifest does not list" for n in sorted(set(backend.inputs) - listed_in)]
    problems += [f"has no output {e['name']!r}" for e in record["outputs"] if e["name"] not in backend.outputs]
    shapes, types = getattr(backend, "shapes", None) or {}, getattr(backend, "types", None) or {}
    for e in record["inputs"] + record["outputs"]:
        got = shapes.get(e["name"])
        if got is not None and (len(got) != len(e["shape"]) or any(
                type(a) is int and type(b) is int and a != b for a, b in zip(got, e["shape"]))):
            problems.append(f"shapes {e['name']!r} {got}, not {e['shape']} as the manifest says")
        dtype = types.get(e["name"])
        if dtype is not None and (dtype.kind == "f") != (e["dtype"] in FLOAT_DTYPES):
            problems.append(f"types {e['name']!r} {dtype}, not {e['dtype']} as the manifest says")
    if problems:
        raise VlmpruneError(f"{what} {problems[0]}"[:300], "re-export the bundle")
    return backend


def run_failure(file: str, exc: Exception) -> VlmpruneError:
    """The last line of defence: an ONNX Runtime failure during a run (whatever a graph and its inputs disagree on
    past every check before it) becomes one line naming the graph, not a traceback. ONNX Runtime raises its own
    exception types (Fail, InvalidArgument, ...), so the callers catch ``Exception`` around the run call only."""
    if isinstance(exc, VlmpruneError):
        return exc
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return VlmpruneError(f"ONNX Runtime failed running {file}: {first[:200]}",
                         "re-export the bundle; if it persists, report this")


class OrtDecoder:
    """The KV-cache decoder on ONNX Runtime with I/O binding: each step's ``present`` OrtValues are bound as the next
    step's ``past_key_values`` without a round trip through numpy.

    Per generated token the inputs are views of preallocated buffers and the logits land in a preallocated
    ``[1, 1, V]`` array; the presents cannot: this standard-op graph concatenates the cache, so ONNX Runtime
    allocates each step's present tensors one token longer (the fused decoder, ``fused_decoder.py``, writes one
    preallocated buffer in place instead)."""

    def __init__(self, backend: OrtBackend, spec: dict):
        self.backend = backend
        self.session = backend.session
        self.layers = spec["num_layers"]
        self.kv_shape = (1, spec["num_kv_heads"], 0, spec["head_dim"])
        self.kv_dtype = np.dtype(spec.get("kv_dtype", "float32"))
        self.file = spec["file"]
        check_io(backend, spec, self.file)
        self.io = io = DecoderNames.of(spec)  # every tensor name from the manifest
        if getattr(backend, "path", None) is not None:  # the graph's wiring pairs each present with its past
            check_cache_pairing(backend.path, io, self.file)
        if io.position_ids is None:
            raise VlmpruneError("the manifest's decoder lists no position_ids input", "re-export the bundle")
        self.past_names, self.present_names = list(io.past), list(io.present)
        # presents stay where the session computes: CUDA memory under the CUDA or the TensorRT provider
        self.device = "cuda" if backend.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        import onnxruntime as ort

        types = backend.inputs
        missing = [n for n in (io.inputs_embeds, io.attention_mask, io.position_ids, *io.past) if n not in types]
        missing += [n for n in (io.logits, *io.present) if n not in backend.outputs]
        if missing:
            raise VlmpruneError(f"{spec['file']} lacks the tensors {', '.join(missing[:3])} the manifest promises",
                                "re-export the bundle")
        self.mask = np.ones((1, spec["max_context"]), types[io.attention_mask])
        self.capacity = self.mask.shape[1]  # cache slots: the decode loop's budget counts them
        self.step_embeds = np.zeros((1, 1, spec["hidden_size"]), types[io.inputs_embeds])
        # [B, S] positions, or M-RoPE's [3, B, S] (Qwen2.5-VL): a generated token has one position on all three axes
        self.step_position = np.zeros((3, 1, 1) if io.position_rank == 3 else (1, 1), types[io.position_ids])
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == io.logits)
        logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        self.logits = np.zeros((1, 1, spec["vocab_size"]), logits_dtype)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # wraps self.logits, no copy
        # a family's prefill-only inputs (DeepStack): bound with their values at the prefill, empty at every step
        self.prefill_names = {e["kind"]: e["name"] for e in spec["inputs"] if e.get("kind") in PREFILL_INPUTS}
        self._prefill_values: dict[str, np.ndarray] = {}
        self.prefill_empty = {kind: empty_value(next(e for e in spec["inputs"] if e["name"] == name), types[name])
                              for kind, name in self.prefill_names.items()}
        self.binding = self.session.io_binding()
        self.reset()

    def reset(self) -> None:
        import onnxruntime as ort

        empty = np.zeros(self.kv_shape, self.kv_dtype)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]
        self.length = 0

    def snapshot(self, length: int) -> list[np.ndarray] | None:
        """Copies of the first ``length`` tokens' KV, one array per past input (``reuse``); None on a device."""
        if self.device != "cpu" or length > self.length:
            return None
        return [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.past]

    def restore(self, arrays: list[np.ndarray], length: int) -> None:
        """Start from the first ``length`` tokens of a ``snapshot`` (the arrays are shared: they are only read)."""
        import onnxruntime as ort

        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a[:, :, :length], self.kv_dtype))
                     for a in arrays]
        self.length = length

    def step(self, embeds: np.ndarray, positions: np.ndarray, prefill_inputs: dict | None = None) -> np.ndarray:
        """Run S new tokens; returns the logits of the last one [V] (for one token: a view that the next step
        overwrites) and keeps the cache. ``prefill_inputs``: values of the graph's prefill-only inputs by kind."""
        unknown = sorted(set(prefill_inputs or ()) - set(self.prefill_names))
        if unknown:
            raise VlmpruneError(f"{self.file} takes no {unknown[0]} input, which this bundle's stitch produced",
                                "re-export the bundle")
        seq = embeds.shape[1]
        if self.length + seq > self.mask.shape[1]:
            raise VlmpruneError(f"the sequence would reach {self.length + seq} tokens, beyond the model's context of "
                                f"{self.mask.shape[1]}", "generate fewer tokens or shorten the prompt")
        binding = self.binding
        if seq == 1:
            np.copyto(self.step_embeds, embeds, casting="same_kind")
            np.copyto(self.step_position, positions.reshape(-1, 1, 1) if self.step_position.ndim == 3
                      else positions.reshape(1, 1), casting="same_kind")
            x, pos = self.step_embeds, self.step_position
        else:
            x = self._prefill = np.ascontiguousarray(embeds, self.step_embeds.dtype)
            pos = self._positions = np.ascontiguousarray(positions, self.step_position.dtype)
        io = self.io
        binding.bind_input(io.inputs_embeds, "cpu", 0, x.dtype.type, list(x.shape), x.ctypes.data)
        binding.bind_input(io.position_ids, "cpu", 0, pos.dtype.type, list(pos.shape), pos.ctypes.data)
        binding.bind_input(io.attention_mask, "cpu", 0, self.mask.dtype.type, [1, self.length + seq],
                           self.mask.ctypes.data)
        for kind, name in self.prefill_names.items():
            value = (prefill_inputs or {}).get(kind)
            value = (self.prefill_empty[kind] if value is None
                     else np.ascontiguousarray(value, self.backend.inputs[name]))
            self._prefill_values[kind] = value  # kept alive until the run is over (bound by address)
            binding.bind_input(name, "cpu", 0, value.dtype.type, list(value.shape), value.ctypes.data)
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        if seq == 1:
            binding.bind_ortvalue_output(io.logits, self._logits_value)
        else:  # a prefill's logits are [1, S, V]: allocated once per request
            binding.bind_output(io.logits, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise run_failure(self.file, exc) from None
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        self.length += seq
        return self.logits[0, -1] if seq == 1 else outputs[0].numpy()[0, -1]
