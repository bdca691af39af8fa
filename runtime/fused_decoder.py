"""The fused decoder on ONNX Runtime: the graph ONNX Runtime GenAI's model builder writes (GroupQueryAttention with
rotary inside, SkipSimplifiedLayerNormalization, packed QKV), taking ``inputs_embeds`` and returning the logits of
the last position only.

Same interface as ``OrtDecoder`` (``reset()``, ``step(embeds, positions) -> logits [V]``). The KV cache is one
past/present buffer per layer and kind, ``[1, Hkv, buffer_length, Dh]``, allocated once and bound as both the
``past_key_values`` input and the ``present`` output, so GroupQueryAttention writes each new token in place. The
graph reads the sequence lengths it needs (``seqlens_k`` = cache + new - 1, ``total_sequence_length``) from an
all-ones ``attention_mask [1, cache + new]``, which is a view into one preallocated row. Per step the generation
loop writes the token's embedding into a preallocated input and re-points two bindings: no tensor is allocated.
"""

from __future__ import annotations

import numpy as np

from vlmprune.errors import VlmpruneError
from vlmprune.graph_io import DecoderNames, check_cache_pairing

from .backends import OrtBackend, check_io, run_failure


class FusedDecoder:
    kind = "fused"

    def __init__(self, backend: OrtBackend, spec: dict, capacity: int | None = None):
        """``capacity``: tokens the KV buffer holds (default and maximum: the manifest's ``buffer_length``, the
        model's context; a caller that knows its longest sequence can allocate less)."""
        import onnxruntime as ort

        self.backend = backend
        self.session = backend.session
        self.spec = spec
        self.layers = spec["num_layers"]
        self.capacity = min(int(capacity or spec["buffer_length"]), int(spec["buffer_length"]))
        self.file = spec["file"]
        check_io(backend, spec, self.file)
        self.io = io = DecoderNames.of(spec, "decoder_fused")  # every tensor name from the manifest
        if getattr(backend, "path", None) is not None:  # the graph's wiring pairs each present with its past
            check_cache_pairing(backend.path, io, self.file)
        self.past_names, self.present_names = list(io.past), list(io.present)
        missing = [n for n in [io.inputs_embeds, io.attention_mask, *self.past_names] if n not in backend.inputs]
        missing += [n for n in [io.logits, *self.present_names] if n not in backend.outputs]
        if missing:
            raise VlmpruneError(f"{spec['file']} lacks the inputs {', '.join(missing[:3])} the manifest promises",
                                "re-export the bundle")
        self.embeds_dtype = np.dtype(backend.inputs[io.inputs_embeds])
        self.kv_dtype = np.dtype(backend.inputs[self.past_names[0]])
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == io.logits)
        logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        # The cache lives where the session computes (CUDA memory on the CUDA provider); inputs and logits are
        # host buffers that ONNX Runtime copies as needed.
        self.device = "cuda" if backend.providers[0] == "CUDAExecutionProvider" else "cpu"
        kv_shape = [1, spec["num_kv_heads"], self.capacity, spec["head_dim"]]
        if self.device == "cpu":  # numpy arrays that the OrtValues wrap (no copy): zeroed, and readable in place
            self.cache_arrays = [np.zeros(kv_shape, self.kv_dtype) for _ in self.past_names]
            self.cache = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.cache_arrays]
        else:
            self.cache_arrays = None
            self.cache = [ort.OrtValue.ortvalue_from_shape_and_type(kv_shape, self.kv_dtype, self.device, 0)
                          for _ in self.past_names]
        self.mask = np.ones((1, self.capacity), backend.inputs[io.attention_mask])
        self.step_embeds = np.zeros((1, 1, spec["hidden_size"]), self.embeds_dtype)
        self.logits = np.zeros((1, 1, spec["vocab_size"]), logits_dtype)
        self.binding = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, self.cache):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # wraps self.logits, no copy
        self.binding.bind_ortvalue_output(io.logits, self._logits_value)
        self._prefill = None  # keeps a prefill's input alive while it is bound
        self.hidden = spec["hidden_size"]
        self._embeds_type = self.embeds_dtype.type
        self._step_pointer = self.step_embeds.ctypes.data
        self._mask_pointer = self.mask.ctypes.data
        self._bound = None  # (pointer, length) of the bound inputs_embeds
        self.length = 0

    def reset(self) -> None:
        # The buffer needs no clearing: GroupQueryAttention reads only the first seqlens_k + 1 positions.
        self.length = 0

    def snapshot(self, length: int) -> list[np.ndarray] | None:
        """Copies of the first ``length`` tokens' KV (``reuse``); None when the buffer lives on a device."""
        if self.cache_arrays is None or length > self.length:
            return None
        return [a[:, :, :length].copy() for a in self.cache_arrays]

    def restore(self, arrays: list[np.ndarray], length: int) -> None:
        """Start from the first ``length`` tokens of a ``snapshot``, written into the preallocated buffer."""
        if length > self.capacity:
            # only a snapshot from another decoder could be this long: the caches are scoped per bundle and decoder
            raise VlmpruneError(f"a cached prefix of {length} tokens exceeds the KV buffer of {self.capacity}",
                                "serve with --cache-mb 0 and report this")
        for dst, src in zip(self.cache_arrays, arrays):
            dst[:, :, :length] = src[:, :, :length]
        self.length = length

    def bind(self, embeds: np.ndarray, cache_length: int) -> None:
        """Point the bindings at ``embeds [1, S, D]`` (contiguous, the graph's dtype) after ``cache_length``
        cached tokens. Used by ``step`` and by the benchmark's bare-session timing."""
        seq = embeds.shape[1]
        pointer = self._step_pointer if embeds is self.step_embeds else embeds.ctypes.data
        if (pointer, seq) != self._bound:  # a generation step re-binds only the mask's length
            self.binding.bind_input(self.io.inputs_embeds, "cpu", 0, self._embeds_type, [1, seq, self.hidden], pointer)
            self._bound = (pointer, seq)
        self.binding.bind_input(self.io.attention_mask, "cpu", 0, self.mask.dtype.type, [1, cache_length + seq],
                                self._mask_pointer)

    def step(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Run S new tokens; returns the logits of the last one ``[V]``, a view that the next step overwrites."""
        seq = embeds.shape[1]
        start = self.length
        if self.length + seq > self.capacity:
            raise VlmpruneError(f"the sequence would reach {self.length + seq} tokens, beyond the fused decoder's "
                                f"KV buffer of {self.capacity}", "generate fewer tokens or shorten the prompt")
        if positions is not None and not _contiguous_from(positions, start, seq):
            # Rotary is applied inside GroupQueryAttention at the cache position; gapped position ids (the
            # `original` positions mode) cannot be expressed, so they must go to the plain decoder.
            raise VlmpruneError("the fused decoder numbers tokens by their cache position and got other position ids",
                                "use --positions contiguous, or the plain decoder")
        if seq == 1:
            np.copyto(self.step_embeds, embeds, casting="same_kind")
            src = self.step_embeds
        else:
            src = self._prefill = np.ascontiguousarray(embeds, dtype=self.embeds_dtype)
        self.bind(src, start)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as exc:
            raise run_failure(self.file, exc) from None
        if src is self._prefill:
            self._prefill = self._bound = None  # its memory may be reused: never reuse its binding
        self.length += seq
        return self.logits[0, -1]


def _contiguous_from(positions: np.ndarray, start: int, seq: int) -> bool:
    p = positions.reshape(-1)
    if p.shape[0] != seq or int(p[0]) != start:
        return False
    return seq == 1 or bool(np.array_equal(p, np.arange(start, start + seq)))
