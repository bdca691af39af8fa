"""The KV-cache decoder on a TensorRT engine (``prune-build --decoder``), same interface as ``OrtDecoder``:
``reset()``, ``step(embeds, positions) -> logits [V]``.

The cache never leaves the GPU. The standard-op decoder graph (the one TensorRT parses) reads ``past_key_values.*``
``[1, Hkv, P, Dh]`` and writes ``present.*`` ``[1, Hkv, P + S, Dh]`` (past and new tokens, concatenated inside the
engine). So every cache tensor gets two device buffers of the context length, allocated once: one is bound as the
past and the other as the present, and they swap roles after each step. Nothing is copied to make that work: a
present of length P + S is written densely at the start of its buffer, which is exactly the layout the next step's
past of length P + S must have.

Per generated token the host copies are the inputs that start on the host, the token's embedding ``[1, 1, D]`` and
its position ``[1, 1]`` (host to device), and the last position's logits ``[V]`` (device to host). The attention
mask is all ones (no padding in a single request): one device row of the context length, uploaded once, bound with
the current length. A prefill copies its ``[1, S, D]`` embeddings (the stitched prompt, kept image tokens included).

I/O dtypes are read from the engine (TensorRT 8.x narrows INT64 inputs to INT32; fp16 engines take fp16 embeddings),
and the engine's optimisation profile must cover the one in the manifest (``trt_profile.decoder_profile``), which
is what ``prune-build --decoder`` builds with.

Written to the TensorRT Python API (``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``/``get_tensor_dtype``/
``get_tensor_profile_shape`` on the engine; ``set_input_shape``/``set_tensor_address``/``execute_async_v3`` on the
context: TensorRT 8.5 and later) and to Polygraphy's CUDA wrapper for device memory (``cudaMalloc``,
``cudaMemcpyAsync`` and a stream through ctypes, no extra CUDA Python package). ``TrtDecoder`` takes the ``tensorrt``
module and the memory object as arguments, which is how the tests run it on CPU against an emulated engine.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import DecoderNames

from .trt_profile import covers, decoder_profile

REBUILD = "rebuild it with `prune-build BUNDLE --decoder` for this bundle"


# --- the binding plan: which buffers live where, which copies happen per step -----------------------------------------


@dataclass
class Copy:
    tensor: str  # the graph's name for it (from the manifest)
    direction: str  # "H2D" or "D2H"
    nbytes: int
    kind: str = ""  # what it is (``graph_io`` kinds)


@dataclass
class BindingPlan:
    capacity: int  # tokens the device cache holds
    device: dict[str, int] = field(default_factory=dict)  # resident device buffers: what -> bytes
    decode: list[Copy] = field(default_factory=list)  # host copies per generated token
    kv_tensors: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.device["kv_cache"]

    def prefill(self, seq: int, hidden_bytes: int) -> list[Copy]:
        """Host copies of a prefill of ``seq`` tokens (``hidden_bytes``: one token's embedding)."""
        embeds, pos, logits = (next(c for c in self.decode if c.kind == k)
                               for k in ("inputs_embeds", "position_ids", "logits"))
        return [Copy(embeds.tensor, "H2D", seq * hidden_bytes, embeds.kind),
                Copy(pos.tensor, "H2D", seq * pos.nbytes, pos.kind), logits]

    def summary(self) -> str:
        h2d = sum(c.nbytes for c in self.decode if c.direction == "H2D")
        d2h = sum(c.nbytes for c in self.decode if c.direction == "D2H")
        return (f"KV cache in device memory ({self.kv_tensors} tensors x 2 buffers of {self.capacity} tokens, "
                f"{_size(self.kv_bytes)}; past/present swapped per step), per token H2D {_size(h2d)} "
                f"(embedding + position), D2H {_size(d2h)} (logits)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def manifest_dtypes(spec: dict, trt_version: str | None) -> dict[str, np.dtype]:
    """The engine's I/O dtypes as the manifest and the engine's TensorRT version predict them (for ``--plan``, which
    opens no engine): TensorRT 8.x narrows INT64 inputs to INT32."""
    narrow = trt_version is not None and int(str(trt_version).split(".")[0]) < 9
    out = {}
    for io in spec["inputs"] + spec["outputs"]:
        dtype = np.dtype(io["dtype"])
        out[io["name"]] = np.dtype(np.int32) if narrow and dtype == np.int64 else dtype
    return out


def binding_plan(spec: dict, capacity: int, dtypes: dict[str, np.dtype]) -> BindingPlan:
    h, dh, hid, vocab = spec["num_kv_heads"], spec["head_dim"], spec["hidden_size"], spec["vocab_size"]
    io = DecoderNames.of(spec)
    kv = sum(2 * capacity * h * dh * np.dtype(dtypes[n]).itemsize for n in io.past)
    plan = BindingPlan(capacity, kv_tensors=len(io.past))
    plan.device = {"kv_cache": kv, "attention_mask": capacity * np.dtype(dtypes[io.attention_mask]).itemsize,
                   "inputs_embeds": hid * np.dtype(dtypes[io.inputs_embeds]).itemsize,
                   "position_ids": np.dtype(dtypes[io.position_ids]).itemsize,
                   "logits": vocab * np.dtype(dtypes[io.logits]).itemsize}
    plan.decode = [Copy(io.inputs_embeds, "H2D", plan.device["inputs_embeds"], "inputs_embeds"),
                   Copy(io.position_ids, "H2D", plan.device["position_ids"], "position_ids"),
                   Copy(io.logits, "D2H", plan.device["logits"], "logits")]
    return plan


# --- device memory -----------------------------------------------------------------------------------------------------


class CudaMemory:  # pragma: no cover - needs a GPU
    """Device buffers and one stream through Polygraphy's CUDA wrapper (``polygraphy.cuda``)."""

    def __init__(self):
        from polygraphy import cuda

        self._cuda = cuda.wrapper()
        self._kind = cuda.MemcpyKind
        self._stream = cuda.Stream()
        self.stream = self._stream.ptr
        self._owned: set[int] = set()

    def alloc(self, nbytes: int, what: str) -> int:
        try:
            ptr = self._cuda.malloc(max(int(nbytes), 1))
        except Exception as exc:  # Polygraphy raises its own exception for any CUDA error
            raise VlmpruneError(f"cannot allocate {_size(nbytes)} of GPU memory for the decoder's {what}: "
                                f"{str(exc).splitlines()[0][:120]}",
                                "free GPU memory (other processes, other engines) or export with a shorter context") from None
        self._owned.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        self._owned.discard(ptr)
        self._cuda.free(ptr)

    def h2d(self, dst: int, array: np.ndarray) -> None:
        self._cuda.memcpy(dst, array.ctypes.data, array.nbytes, self._kind.HostToDevice, self.stream)

    def d2h(self, array: np.ndarray, src: int) -> None:
        self._cuda.memcpy(array.ctypes.data, src, array.nbytes, self._kind.DeviceToHost, self.stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        for ptr in list(self._owned):
            self.free(ptr)
        self._stream.free()


# --- the decoder --------------------------------------------------------------------------------------------------------


class TrtDecoder:
    kind = "tensorrt"

    def __init__(self, engine, spec: dict, memory, trt, *, capacity: int | None = None, name: str = "decoder.engine"):
        """``engine``: a deserialised ``tensorrt.ICudaEngine``; ``trt``: the ``tensorrt`` module; ``memory``: device
        memory and a stream (``CudaMemory``); ``capacity``: tokens the cache holds (default and maximum: the
        manifest's context)."""
        self.engine, self.memory, self.trt, self.spec, self.name = engine, memory, trt, spec, name
        self.io = io = DecoderNames.of(spec)  # every tensor name from the manifest
        if io.position_ids is None or io.position_rank != 2:
            raise VlmpruneError(f"the TensorRT decoder takes [B, S] position ids; this bundle's decoder takes rank "
                                f"{io.position_rank}", "run the decoder on ONNX Runtime (no --engines decoder)")
        self.past_names, self.present_names = list(io.past), list(io.present)
        inputs, dtypes = set(), {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            dtypes[tensor] = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
            if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                inputs.add(tensor)
        wanted_in = [io.inputs_embeds, io.attention_mask, io.position_ids, *self.past_names]
        missing = [t for t in wanted_in if t not in inputs] + [t for t in [io.logits, *self.present_names]
                                                                 if t not in dtypes or t in inputs]
        if missing:
            raise VlmpruneError(f"{name} lacks the tensors {', '.join(missing[:3])} of the manifest's decoder", REBUILD)
        self.dtypes = dtypes
        # The engine's profile must allow every shape the manifest's does (prefill up to the context, decode up to
        # context - 1 cached tokens); otherwise a long prompt would fail in the middle of a request.
        engine_profile = {t: tuple(tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(t, 0))
                          for t in wanted_in}
        problems = covers(engine_profile, decoder_profile(spec))
        if problems:
            raise VlmpruneError(f"{name}'s optimisation profile does not cover the manifest's: {problems[0]}", REBUILD)
        self.capacity = min(int(capacity or spec["max_context"]), int(spec["max_context"]))
        self.max_seq = engine_profile[io.inputs_embeds][2][1]
        self.plan = binding_plan(spec, self.capacity, dtypes)
        self.hidden, self.heads, self.head_dim = spec["hidden_size"], spec["num_kv_heads"], spec["head_dim"]
        self.context = engine.create_execution_context()
        if self.context is None:
            raise VlmpruneError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)",
                                "free GPU memory or use a smaller engine")
        # resident device buffers, allocated once
        kv_bytes = [self.capacity * self.heads * self.head_dim * dtypes[t].itemsize for t in self.past_names]
        self.kv = [[memory.alloc(n, "KV cache") for n in kv_bytes] for _ in range(2)]
        self.mask_ptr = memory.alloc(self.capacity * dtypes[io.attention_mask].itemsize, "attention mask")
        memory.h2d(self.mask_ptr, np.ones(self.capacity, dtypes[io.attention_mask]))  # the only upload of the mask
        memory.synchronize()
        self.rows = 0  # tokens the embeds/positions/logits buffers hold; grown to the longest prefill seen
        self.embeds_ptr = self.positions_ptr = self.logits_ptr = 0
        self._reserve(1)
        # host staging: the one token's inputs, and the logits of the last position (returned, overwritten next step)
        self.step_embeds = np.zeros((1, 1, self.hidden), dtypes[io.inputs_embeds])
        self.step_position = np.zeros((1, 1), dtypes[io.position_ids])
        self.logits = np.zeros(spec["vocab_size"], dtypes[io.logits])
        self.side = 0
        self.length = 0

    def _reserve(self, seq: int) -> None:
        """Room for ``seq`` new tokens' inputs and logits. Decode steps never allocate; a prefill longer than any
        before reallocates these three buffers once (logits [S, V] are large, so they are not sized for the whole
        context up front)."""
        if seq <= self.rows:
            return
        d, m, io = self.dtypes, self.memory, self.io
        for ptr in (self.embeds_ptr, self.positions_ptr, self.logits_ptr):
            if ptr:
                m.free(ptr)
        self.embeds_ptr = m.alloc(seq * self.hidden * d[io.inputs_embeds].itemsize, "input embeddings")
        self.positions_ptr = m.alloc(seq * d[io.position_ids].itemsize, "position ids")
        self.logits_ptr = m.alloc(seq * self.spec["vocab_size"] * d[io.logits].itemsize, "logits")
        self.rows = seq

    def reset(self) -> None:
        self.length = 0  # the next step binds a past of length 0: nothing stale is read
        self.side = 0

    def step(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run S new tokens; returns the logits of the last one ``[V]`` (a host array the next step overwrites)."""
        seq = embeds.shape[1]
        past, total = self.length, self.length + embeds.shape[1]
        if total > self.capacity:
            raise VlmpruneError(f"the sequence would reach {total} tokens, beyond the decoder's cache of "
                                f"{self.capacity}", "generate fewer tokens or shorten the prompt")
        if seq > self.max_seq:
            raise VlmpruneError(f"a prompt of {seq} tokens is longer than {self.name} takes at once ({self.max_seq})",
                                "shorten the prompt, or " + REBUILD)
        self._reserve(seq)
        if seq == 1:
            np.copyto(self.step_embeds, embeds, casting="same_kind")
            np.copyto(self.step_position, positions.reshape(1, 1), casting="same_kind")  # int64 -> int32 on 8.x
            x, pos = self.step_embeds, self.step_position
        else:
            x = np.ascontiguousarray(embeds, self.step_embeds.dtype)
            pos = np.ascontiguousarray(positions, self.step_position.dtype)
        m, ctx, io = self.memory, self.context, self.io
        m.h2d(self.embeds_ptr, x)
        m.h2d(self.positions_ptr, pos)
        ok = (ctx.set_input_shape(io.inputs_embeds, (1, seq, self.hidden))
              and ctx.set_input_shape(io.position_ids, (1, seq))
              and ctx.set_input_shape(io.attention_mask, (1, total)))
        ok = ok and ctx.set_tensor_address(io.inputs_embeds, self.embeds_ptr)
        ok = ok and ctx.set_tensor_address(io.position_ids, self.positions_ptr)
        ok = ok and ctx.set_tensor_address(io.attention_mask, self.mask_ptr)
        ok = ok and ctx.set_tensor_address(io.logits, self.logits_ptr)
        kv_shape = (1, self.heads, past, self.head_dim)
        for tensor, ptr in zip(self.past_names, self.kv[self.side]):
            ok = ok and ctx.set_input_shape(tensor, kv_shape) and ctx.set_tensor_address(tensor, ptr)
        for tensor, ptr in zip(self.present_names, self.kv[1 - self.side]):
            ok = ok and ctx.set_tensor_address(tensor, ptr)
        if not ok:
            raise VlmpruneError(f"TensorRT refused the shapes of a {seq}-token step after {past} cached tokens "
                                f"for {self.name}", REBUILD)
        if not ctx.execute_async_v3(m.stream):
            raise VlmpruneError(f"TensorRT failed to run {self.name} (see its log above)", REBUILD)
        row = self.logits.nbytes
        m.d2h(self.logits, self.logits_ptr + (seq - 1) * row)  # the last position's logits only
        m.synchronize()
        self.side ^= 1
        self.length = total
        return self.logits

    def close(self) -> None:
        close = getattr(self.memory, "close", None)
        if close is not None:
            close()


def load_trt_decoder(engine_path: Path, meta: dict, spec: dict,
                     capacity: int | None = None) -> TrtDecoder:  # pragma: no cover - needs TensorRT and a GPU
    try:
        import tensorrt as trt
    except ImportError:
        from .gpu import trt_install_fix

        raise VlmpruneError("TensorRT is not installed here", f"{trt_install_fix()}, or run without --engines") from None
    from .trt_backend import check_engine_compat, current_device

    check_engine_compat(meta, trt.__version__, **current_device(), engine_name=engine_path.name)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    # mapped, not read: a 7B fp16 engine is ~13 GB, and on a Jetson host and GPU share that memory
    with open(engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise VlmpruneError(f"TensorRT cannot deserialize {engine_path.name}", REBUILD)
    decoder = TrtDecoder(engine, spec, CudaMemory(), trt, capacity=capacity, name=engine_path.name)
    decoder.runtime = runtime  # the runtime must outlive its engine
    return decoder
