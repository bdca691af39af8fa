"""What each input and output of a bundle's graphs is, as the manifest records it.

Every entry of a graph's ``inputs``/``outputs`` in the manifest carries a ``kind`` (what the tensor is) beside its
``name`` (what the graph calls it); KV-cache entries also carry their ``layer``. The runtime finds tensors by kind and
binds them by the recorded name, so names belong to the exporter: a family whose decoder names its cache differently
declares its templates in its adapter file (``models/registry.py`` ``DecoderIO``) and the runtime does not change.

Torch-free: the runtime imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmprune.errors import VlmpruneError

# The kinds per graph role. A vision graph's outputs are either one kept sequence (``image_embeds``/``kept_indices``)
# or anyres's two parts (``base_*`` and ``raster_*`` with ``raster_count``).
VISION_INPUTS = ("pixel_values", "valid_mask", "text_embeds", "clip_pixel_values")
VISION_OUTPUTS = ("image_embeds", "kept_indices", "base_embeds", "base_indices", "raster_embeds", "raster_indices",
                  "raster_count", "deepstack_embeds")
TEXT_INPUTS = ("input_ids",)
TEXT_OUTPUTS = ("text_embeds",)
DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "past_key", "past_value")
# Decoder inputs a family may add, fed at the prefill only and empty (their dynamic axes 0) at every generated token:
# DeepStack (Qwen3-VL) adds visual features from intermediate encoder layers to the first decoder layers' hidden
# states, ``deepstack_embeds [levels, K, D]`` (the vision graph's output of the same kind, the kept tokens' rows) at
# the sequence positions ``deepstack_positions [K]`` of the prefill (where the kept image tokens were stitched).
PREFILL_INPUTS = ("deepstack_embeds", "deepstack_positions")
DECODER_OUTPUTS = ("logits", "present_key", "present_value")
PER_LAYER = ("past_key", "past_value", "present_key", "present_value")
# What each kind is: integer or floating point, and its rank(s). The schema holds every entry to it, and the runtime
# compares entries with the graphs it opens (``runtime.backends.check_io``), so kinds cannot be swapped unnoticed.
FORM = {
    "pixel_values": ("float", (4, 2)),  # [V, 3, H, W], or Qwen2.5-VL's flattened patches [N, C*T*P*P]
    "valid_mask": ("float", (2,)), "text_embeds": ("float", (2,)), "clip_pixel_values": ("float", (4,)),
    "image_embeds": ("float", (3,)), "kept_indices": ("int", (2,)),
    "base_embeds": ("float", (3,)), "base_indices": ("int", (2,)), "raster_embeds": ("float", (3,)),
    "raster_indices": ("int", (2,)), "raster_count": ("int", (1,)),
    "input_ids": ("int", (2,)),
    "inputs_embeds": ("float", (3,)), "attention_mask": ("int", (2,)), "position_ids": ("int", (2, 3)),
    "past_key": ("float", (4,)), "past_value": ("float", (4,)), "logits": ("float", (3,)),
    "present_key": ("float", (4,)), "present_value": ("float", (4,)),
    "deepstack_embeds": ("float", (3,)), "deepstack_positions": ("int", (1,)),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")

KINDS = tuple(dict.fromkeys(VISION_INPUTS + VISION_OUTPUTS + TEXT_INPUTS + TEXT_OUTPUTS + DECODER_INPUTS
                            + PREFILL_INPUTS + DECODER_OUTPUTS))

# The standard names (optimum's and ONNX Runtime GenAI's, which its model builder writes): each vision and text tensor
# named by its kind, the cache ``past_key_values.{i}.key|value`` / ``present.{i}.key|value``. Schema versions 1 and 2
# recorded names only, and their exporters always wrote these, so reading kinds from them is what those formats
# defined, not a guess; bundles of version 3 and later carry their kinds.
_STANDARD_LAYER = re.compile(r"^(past_key_values|present)\.(0|[1-9][0-9]{0,3})\.(key|value)$")


def standard_kind(name: str) -> tuple[str, int | None] | None:
    """(kind, layer) of a tensor with its standard name; None for any other name."""
    m = _STANDARD_LAYER.match(name)
    if m:
        return f"{'past' if m.group(1) == 'past_key_values' else 'present'}_{m.group(3)}", int(m.group(2))
    return (name, None) if name in KINDS and name not in PER_LAYER else None


def add_legacy_kinds(entries: list) -> None:
    """Give the entries of a version 1 or 2 graph the kinds of their names, in place. Those versions wrote no kinds,
    so any found in such a file were crafted and are replaced; an entry of an unknown name is left kind-less, which
    validation refuses."""
    for entry in entries:
        if isinstance(entry, dict):
            entry.pop("kind", None)
            entry.pop("layer", None)
            found = standard_kind(entry["name"]) if isinstance(entry.get("name"), str) else None
            if found:
                entry["kind"] = found[0]
                if found[1] is not None:
                    entry["layer"] = found[1]


def with_kinds(entries: list[dict], kinds: dict[str, tuple[str, int | None] | str]) -> list[dict]:
    """The exporter's side: ``entries`` (name, shape, dtype) with the kind (and layer) of each, from ``kinds``
    (name -> kind or (kind, layer)). A name without a kind is refused: the bundle would not say what it is."""
    out = []
    for entry in entries:
        if entry["name"] not in kinds:
            raise ValueError(f"graph tensor {entry['name']!r} has no kind; add it to the exporter's I/O map")
        kind = kinds[entry["name"]]
        kind, layer = (kind, None) if isinstance(kind, str) else kind
        if kind not in KINDS:
            raise ValueError(f"unknown tensor kind {kind!r} for {entry['name']!r}")
        out.append({**entry, "kind": kind, **({"layer": layer} if layer is not None else {})})
    return out


def find(entries: list[dict], kind: str, layer: int | None = None) -> dict | None:
    return next((e for e in entries if e.get("kind") == kind and e.get("layer") == layer), None)


def has(entries: list[dict], kind: str) -> bool:
    return any(e.get("kind") == kind for e in entries)


def name_of(entries: list[dict], kind: str, where: str, layer: int | None = None) -> str:
    """The recorded name of the ``kind`` tensor (of ``layer``) among ``entries``; one line when there is none."""
    entry = find(entries, kind, layer)
    if entry is None:
        what = kind if layer is None else f"{kind} of layer {layer}"
        raise VlmpruneError(f"the manifest's {where} lists no {what} tensor", "re-export the bundle")
    return entry["name"]


@dataclass(frozen=True)
class DecoderNames:
    """A KV-cache decoder's tensor names, read from its manifest record (``decoder`` or ``decoder_fused``)."""

    inputs_embeds: str
    attention_mask: str
    position_ids: str | None  # the fused decoder computes positions from the mask and has none
    position_rank: int  # 2: [B, S]; 3: M-RoPE's [3, B, S]
    logits: str
    past: tuple[str, ...]  # layer 0 key, layer 0 value, layer 1 key, ...
    present: tuple[str, ...]  # in the same order as ``past``

    @classmethod
    def of(cls, record: dict, where: str = "decoder") -> "DecoderNames":
        ins, outs = record["inputs"], record["outputs"]
        pos = find(ins, "position_ids")
        layers = range(record["num_layers"])
        return cls(
            inputs_embeds=name_of(ins, "inputs_embeds", f"{where} inputs"),
            attention_mask=name_of(ins, "attention_mask", f"{where} inputs"),
            position_ids=pos["name"] if pos else None,
            position_rank=len(pos["shape"]) if pos else 2,
            logits=name_of(outs, "logits", f"{where} outputs"),
            past=tuple(name_of(ins, f"past_{kv}", f"{where} inputs", layer) for layer in layers for kv in ("key", "value")),
            present=tuple(name_of(outs, f"present_{kv}", f"{where} outputs", layer)
                          for layer in layers for kv in ("key", "value")),
        )


def empty_value(entry: dict, dtype) -> "np.ndarray":
    """The value of a prefill-only input (``PREFILL_INPUTS``) at a step without it: its static sizes, 0 on every
    dynamic axis (ONNX Runtime binds zero-size tensors; a MatMul over K = 0 contributes nothing)."""
    import numpy as np

    return np.zeros([d if type(d) is int else 0 for d in entry["shape"]], dtype)


def feeds(entries: list[dict], values: dict, where: str) -> dict:
    """A graph's feeds keyed by its recorded input names, from ``values`` keyed by kind. Every input the graph
    takes must have a value: a graph input this runtime does not know gets one line, not a wrong run."""
    out = {}
    for entry in entries:
        kind = entry.get("kind")
        if kind not in values:
            raise VlmpruneError(f"the {where} graph takes {entry['name']!r} (kind {kind}), which this runtime has no "
                                "value for", "re-export the bundle with this version of vlmprune")
        out[entry["name"]] = values[kind]
    return out


def by_kind(entries: list[dict], results: dict) -> dict:
    """A graph's results (keyed by recorded output names) keyed by kind; a listed output missing is one line."""
    missing = [entry["name"] for entry in entries if entry["name"] not in results]
    if missing:
        raise VlmpruneError(f"the graph returned no {missing[0]!r}, which the manifest lists", "re-export the bundle")
    return {entry["kind"]: results[entry["name"]] for entry in entries}


# The kept sequences a vision graph may output: (embeddings, kept indices, valid count or None) kinds. One view's
# graph outputs the first; a base-plus-raster graph the other two (its raster's valid length in ``raster_count``).
VISION_PARTS = (("image_embeds", "kept_indices", None), ("base_embeds", "base_indices", None),
                ("raster_embeds", "raster_indices", "raster_count"))
# Vision outputs gathered with a part's kept indices along their axis 1 (DeepStack's [levels, K, D]): output kind ->
# the indices kind it follows.
ALIGNED_OUTPUTS = {"deepstack_embeds": "kept_indices"}


_PASS_THROUGH = ("Cast", "Identity")


def cache_pairing_problem(nodes: list[tuple[str, list[str], list[str]]], names: DecoderNames) -> str | None:
    """Whether the graph's own wiring contradicts the manifest's pairing of each ``present`` output with its
    ``past`` input (same layer, same key/value kind): the node that writes a present (``Concat`` in the standard-op
    decoder, ``GroupQueryAttention`` in the fused one) reads its past directly, or through a Cast. A manifest whose
    cache kinds were relabelled between layers would feed one layer's cache to another, silently. Returns the first
    contradiction, or None (also when the wiring does not show the pairing)."""
    producer = {out: (op, ins) for op, ins, outs in nodes for out in outs}
    index = {name: i for i, name in enumerate(names.past)}
    for i, present in enumerate(names.present):
        node = producer.get(present)
        if node is None:
            continue
        found = set()
        for x in node[1]:
            for _ in range(4):  # through a few Cast/Identity nodes
                if x in index:
                    found.add(x)
                    break
                p = producer.get(x)
                if p is None or p[0] not in _PASS_THROUGH or not p[1]:
                    break
                x = p[1][0]
        same_kind = [x for x in found if index[x] % 2 == i % 2]  # keys with keys, values with values
        if len(same_kind) == 1 and index[same_kind[0]] != i:
            return (f"writes {present!r} from {same_kind[0]!r}, but the manifest pairs it with {names.past[i]!r} "
                    "(cache kinds or layers relabelled)")
    return None


def check_cache_pairing(path, names: DecoderNames, file: str) -> None:
    from .onnx_wire import main_graph_nodes

    problem = cache_pairing_problem(main_graph_nodes(path), names)
    if problem:
        raise VlmpruneError(f"{file} {problem}", "re-export the bundle")

