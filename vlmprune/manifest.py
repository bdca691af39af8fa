"""The manifest schema: one typed definition, its version, and its validator. Torch-free (the runtime imports it).

Hand-written (a few small type classes) rather than pydantic or jsonschema: the edge runtime installs neither, and
the checks we need go beyond types (ranges, cross-field rules such as ``num_patches == grid[0] * grid[1]``,
``k <= num_patches``, token ids below the vocabulary size) and must end in one line naming the field.

Paths: every path-valued field goes through one rule (``integrity.check_relpath``) and must name a file of the
bundle's integrity record, which the reader has checked to be a regular file inside the bundle. Fields this schema
does not declare are allowed (newer writers add some), but any of them whose key names a path (``file``,
``weights``, ``tokenizer``, ``files``, ``*_file``, ``*_files``, ``*_path``) is held to the same rule.

Version 2 moved the integrity record out of the manifest into ``record.json`` (which also covers
``manifest.json``) and the outputs of prune-build / prune-calibrate into their own subfolders; version 1 bundles
are read by ``upgrade_v1``.

Version 3 gives every graph input and output a ``kind`` (and KV-cache entries a ``layer``), which the runtime finds
tensors by (``vlmprune.graph_io``); versions 1 and 2 are read by ``upgrade_v2``, which gives their entries the kinds
of the fixed names those versions wrote.

Version 4 names the bundle's model ``family`` (its folder under ``models/``), which the runtime picks the family's
hooks by, once; older manifests get it from the family declaration they recorded under ``model.family`` (or, with
none, from the family whose runtime claims their layout).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import VlmpruneError
from .graph_io import (DECODER_INPUTS, DECODER_OUTPUTS, FLOAT_DTYPES, FORM, INT_DTYPES, KINDS, PER_LAYER,
                       PREFILL_INPUTS, TEXT_INPUTS, TEXT_OUTPUTS, VISION_INPUTS, VISION_OUTPUTS, add_legacy_kinds)
from .integrity import check_relpath

SCHEMA_VERSION = 4
MANIFEST = "manifest.json"
FIX = "re-export the bundle with `prune-export`"
PATH_KEYS = ("file", "weights", "tokenizer", "files")
PATH_SUFFIXES = ("_file", "_files", "_path")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# v1 bundles listed derived outputs (engines, Q/DQ graphs, calibration, profiles) in their checksums; v2 keeps them in
# their own folders with their own records.
DERIVED_PREFIXES = ("engines/", "int8/", "qdq/", "calib/", "profile/")


class Invalid(Exception):
    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where} {problem}")


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- types ------------------------------------------------------------------------------------------------------------


class T:
    def check(self, value: Any, where: str, paths: list) -> None:
        raise NotImplementedError


@dataclass
class Any_(T):
    def check(self, value, where, paths):
        pass


@dataclass
class Int(T):
    lo: int | None = None
    hi: int | None = None

    def check(self, value, where, paths):
        if type(value) is not int:  # bool is an int in Python; not here
            raise Invalid(where, f"must be an integer, got {_got(value)}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            rng = f"{self.lo if self.lo is not None else '-inf'}..{self.hi if self.hi is not None else 'inf'}"
            raise Invalid(where, f"must be in {rng}, got {value}")


@dataclass
class Float(T):
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def check(self, value, where, paths):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise Invalid(where, f"must be a finite number, got {_got(value)}")
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and value > self.hi
        if below or above:
            left = "(" if self.lo_open else "["
            raise Invalid(where, f"must be in {left}{self.lo}, {self.hi}], got {value}")


@dataclass
class Bool(T):
    def check(self, value, where, paths):
        if type(value) is not bool:
            raise Invalid(where, f"must be true or false, got {_got(value)}")


@dataclass
class Str(T):
    choices: tuple | None = None
    max_len: int = 4096
    min_len: int = 0

    def check(self, value, where, paths):
        if not isinstance(value, str):
            raise Invalid(where, f"must be a string, got {_got(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid(where, f"must have {self.min_len}..{self.max_len} characters, has {len(value)}")
        if self.choices is not None and value not in self.choices:
            raise Invalid(where, f"must be one of {', '.join(self.choices)}, got {_got(value)}")


@dataclass
class Path_(T):
    def check(self, value, where, paths):
        paths.append((where, value))


@dataclass
class Opt(T):
    inner: T

    def check(self, value, where, paths):
        if value is not None:
            self.inner.check(value, where, paths)


@dataclass
class OneOf(T):
    options: tuple
    what: str

    def check(self, value, where, paths):
        for option in self.options:
            try:
                option.check(value, where, [])
            except Invalid:
                continue
            option.check(value, where, paths)
            return
        raise Invalid(where, f"must be {self.what}, got {_got(value)}")


@dataclass
class List(T):
    item: T
    min_len: int = 0
    max_len: int = 1 << 20
    length: int | None = None

    def check(self, value, where, paths):
        if not isinstance(value, list):
            raise Invalid(where, f"must be a list, got {_got(value)}")
        if self.length is not None and len(value) != self.length:
            raise Invalid(where, f"must have {self.length} entries, has {len(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid(where, f"must have {self.min_len}..{self.max_len} entries, has {len(value)}")
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]", paths)


@dataclass
class Map(T):
    value: T = field(default_factory=Any_)

    def check(self, value, where, paths):
        if not isinstance(value, dict):
            raise Invalid(where, f"must be an object, got {_got(value)}")
        for k, v in value.items():
            self.value.check(v, f"{where}.{k}", paths)


@dataclass
class Obj(T):
    fields: dict[str, T]
    optional: tuple[str, ...] = ()

    def check(self, value, where, paths):
        if not isinstance(value, dict):
            raise Invalid(where, f"must be an object, got {_got(value)}")
        for name, kind in self.fields.items():
            sub = f"{where}.{name}" if where else name
            if name not in value:
                if name in self.optional:
                    continue
                raise Invalid(sub, "is missing")
            kind.check(value[name], sub, paths)


# --- the schema -------------------------------------------------------------------------------------------------------

DIM = OneOf((Int(0, 1 << 31), Str(max_len=128)), "a size or a dimension name")
IO = List(Obj({"name": Str(min_len=1, max_len=256), "shape": List(DIM, max_len=16), "dtype": Str(max_len=32),
               "kind": Str(KINDS), "layer": Int(0, 4096)}, optional=("layer",)),
          max_len=8192)
TOKEN = Opt(Int(0, 1 << 31))
PATHS = OneOf((Path_(), List(Path_(), max_len=4096)), "a file path or a list of them")

BUCKET = Obj({
    "name": Str(min_len=1, max_len=128), "method": Str(min_len=1, max_len=64), "keep": Float(0.0, 1.0, lo_open=True),
    "k": Int(1, 1 << 20), "options": Map(), "file": Path_(), "inputs": IO, "outputs": IO,
})

VIEW = Obj({"name": Str(max_len=64), "image_size": List(Int(1, 8192), length=2), "grid": List(Int(1, 1024), length=2),
            "num_patches": Int(1, 1 << 20), "has_cls": Bool()}, optional=("name",))

DECODER = Obj({
    "file": Path_(), "weights": Opt(PATHS), "inputs": IO, "outputs": IO,
    "num_layers": Int(1, 4096), "num_heads": Int(1, 4096), "num_kv_heads": Int(1, 4096), "head_dim": Int(1, 1 << 16),
    "hidden_size": Int(1, 1 << 20), "vocab_size": Int(1, 1 << 24), "max_context": Int(2, 1 << 24),
    "bos_token_id": TOKEN, "eos_token_id": TOKEN, "pad_token_id": TOKEN,
    "kv_dtype": Str(("float32", "float16")),
    "embeddings": Obj({"file": Path_(), "shape": List(Int(1, 1 << 24), length=2), "dtype": Str(("float32", "float16"))}),
    # written by the decoder-precision export (issue 9); optional so that bundles from before it still read
    "precision": Str(("fp32", "fp16", "int8", "int4")),
    "fp32_outputs": List(Str(max_len=256), max_len=4096),
    "fused": Opt(Map()),  # a second, fused decoder: any shape, its paths confined by the generic rule
}, optional=("weights", "bos_token_id", "pad_token_id", "kv_dtype", "precision", "fp32_outputs", "fused"))

# ONNX Runtime's fused decoder (issue 14), next to "decoder" (which TensorRT uses): the fields the runtime reads; the
# rest (producer, quantization, ops) is provenance. Optional: bundles without it use "decoder" on every provider.
FLOAT = Str(("float32", "float16"))
FUSED_DECODER = Obj({
    "file": Path_(), "weights": Opt(PATHS), "inputs": IO, "outputs": IO,
    "precision": Str(("fp32", "fp16", "int8", "int4")),
    "num_layers": Int(1, 4096), "num_heads": Int(1, 4096), "num_kv_heads": Int(1, 4096), "head_dim": Int(1, 1 << 16),
    "hidden_size": Int(1, 1 << 20), "vocab_size": Int(1, 1 << 24), "buffer_length": Int(2, 1 << 24),
    "kv_dtype": FLOAT, "embeds_dtype": FLOAT, "logits_dtype": FLOAT, "positions": Str(("contiguous",)),
    "providers": List(Str(min_len=1, max_len=64), min_len=1, max_len=16),
}, optional=("weights",))

MANIFEST_SCHEMA = Obj({
    "schema_version": Int(1, SCHEMA_VERSION),
    "family": Str(min_len=1, max_len=64),
    "created_by": Obj({"vlmprune": Str(min_len=1, max_len=64)}),
    "created_at": Str(max_len=64),
    "model": Map(),
    "method": Obj({"name": Str(min_len=1, max_len=64), "options": Map(), "needs": List(Str(max_len=64))},
                  optional=("options", "needs")),
    "target": Str(max_len=64),
    "opset": Int(1, 64),
    "precision": Str(("fp32", "fp16")),
    "preprocessing": Obj({
        "resize_shortest_edge": Int(1, 8192), "crop_size": List(Int(1, 8192), length=2), "resample": Str(RESAMPLE),
        "do_resize": Bool(), "do_center_crop": Bool(), "do_rescale": Bool(),
        "rescale_factor": Float(0.0, 1e6, lo_open=True), "do_normalize": Bool(),
        "mean": List(Float(-1e6, 1e6), length=3), "std": List(Float(0.0, 1e6, lo_open=True), length=3),
        "do_convert_rgb": Bool(),
    }, optional=("do_convert_rgb",)),
    "vision": Obj({
        "view": VIEW,
        "views": List(VIEW, min_len=1, max_len=64),  # every view the graphs take; "view" is the first
        "fp32_scopes": List(Str(min_len=1, max_len=512), max_len=64),  # regular expressions over ONNX node names
        "int8_float_scopes": List(Str(min_len=1, max_len=512), max_len=64),  # node-name substrings kept float
        "weights": Opt(PATHS),
        "buckets": List(BUCKET, min_len=1, max_len=1024),
    }, optional=("weights", "views", "fp32_scopes", "int8_float_scopes")),
    "text_encoder": Opt(Obj({
        "file": Path_(), "weights": Opt(PATHS), "inputs": IO, "outputs": IO, "tokenizer": Path_(),
        "max_length": Int(2, 1 << 16), "projection_dim": Int(1, 1 << 16),
    }, optional=("weights",))),
    "prompt": Obj({
        "tokenizer": Path_(), "chat_template": Opt(Str(max_len=256 << 10)), "image_token": Str(min_len=1, max_len=64),
        "image_token_id": Int(0, 1 << 31), "stitch": Str(("replace_placeholder", "anyres_raster")),
        "positions": Str(("contiguous", "original")),
    }, optional=("chat_template", "positions")),
    "decoder": DECODER,
    "decoder_fused": Opt(FUSED_DECODER),
    "decoder_fused_skipped": Str(min_len=1, max_len=256),  # why the export made no fused decoder
    "lint": Opt(Map()),
    "validation": Opt(Obj({"file": Path_(), "passed": Bool(), "checks": Int(0, 1 << 31)})),
}, optional=("family", "created_at", "model", "target", "opset", "precision", "decoder_fused", "decoder_fused_skipped",
             "lint", "validation"))


# --- cross-field rules ------------------------------------------------------------------------------------------------


MAX_OPTIONAL = 8  # "x?" items per pattern: at most 2**8 ways to try each one at a position


def unsafe_pattern(pattern: str) -> str | None:
    """Why a regular expression from a manifest may not run, or None. A manifest is untrusted input, and a pattern
    such as ``(.+)+\\x00`` backtracks for hours on one node name, so only a safe form is accepted: literals, ``.``,
    classes, anchors, alternation and groups, with ``?`` on single characters only (at most ``MAX_OPTIONAL``). No
    ``*``, ``+``, ``{m,n}``, back-references or look-arounds: such a pattern matches within a bounded number of
    steps per position. The families' own scopes (``(^|/)method/``, ``layer_?norm|LayerNormalization``) fit it."""
    try:
        parsed = _sre_parse(pattern)
    except re.error as exc:
        return f"is not a regular expression ({exc})"
    optional = 0
    stack = [list(parsed)]
    while stack:
        for op, arg in stack.pop():
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, body = arg
                items = list(body)
                if high > 1 or len(items) != 1 or str(items[0][0]) in ("SUBPATTERN", "BRANCH"):
                    return ("repeats a group or uses *, + or {m,n}, which can backtrack without bound on a node "
                            "name; use literals, alternation and ? on single characters")
                optional += 1
                stack.append(items)
            elif name == "SUBPATTERN":
                stack.append(list(arg[-1]))
            elif name == "BRANCH":
                stack.extend(list(branch) for branch in arg[1])
            elif name in ("GROUPREF", "GROUPREF_EXISTS", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP"):
                return "uses a back-reference or look-around, which the safe pattern form leaves out"
    if optional > MAX_OPTIONAL:
        return f"has {optional} optional items, more than {MAX_OPTIONAL}"
    return None


def _sre_parse(pattern: str):
    try:  # the standard library's own regular-expression parser (Python 3.11+: re._parser; before: sre_parse)
        from re import _parser as parser
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    return parser.parse(pattern)



def _cross_checks(m: dict) -> None:
    view = m["vision"]["view"]
    views = m["vision"].get("views")
    for where, v in [("vision.view", view), *((f"vision.views[{i}]", v) for i, v in enumerate(views or []))]:
        (h, w), (gh, gw) = v["image_size"], v["grid"]
        if h * gw != w * gh:  # square patches: the grid has the image's aspect ratio
            raise Invalid(f"{where}.grid", f"{v['grid']} does not have the aspect ratio of the {h}x{w} image")
        if v["num_patches"] != v["grid"][0] * v["grid"][1]:
            raise Invalid(f"{where}.num_patches", f"is {v['num_patches']}, but the grid {v['grid']} holds "
                          f"{v['grid'][0] * v['grid'][1]}")
    if views and views[0] != view:
        raise Invalid("vision.views[0]", "differs from vision.view (the first view)")
    for i, scope in enumerate(m["vision"].get("fp32_scopes") or []):
        problem = unsafe_pattern(scope)
        if problem:
            raise Invalid(f"vision.fp32_scopes[{i}]", problem)
    names = set()
    for i, b in enumerate(m["vision"]["buckets"]):
        views = b.get("num_views", 1)  # anyres buckets take several views of view["num_patches"] each
        if type(views) is not int or not 1 <= views <= 64:
            raise Invalid(f"vision.buckets[{i}].num_views", f"must be an integer in 1..64, got {_got(views)}")
        if b["k"] > view["num_patches"] * views:
            raise Invalid(f"vision.buckets[{i}].k", f"is {b['k']}, more than the {view['num_patches'] * views} patches")
        if b["name"] in names:
            raise Invalid(f"vision.buckets[{i}].name", f"{b['name']!r} is used twice")
        names.add(b["name"])
        if any(io["kind"] == "text_embeds" for io in b["inputs"]) and not m.get("text_encoder"):
            raise Invalid(f"vision.buckets[{i}].inputs", "takes text_embeds, but the bundle has no text_encoder")
    pre = m["preprocessing"]
    if pre["do_center_crop"] and pre["crop_size"] != view["image_size"]:
        raise Invalid("preprocessing.crop_size", f"is {pre['crop_size']}, the vision graphs take {view['image_size']}")
    d = m["decoder"]
    vocab = d["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if d.get(key) is not None and d[key] >= vocab:
            raise Invalid(f"decoder.{key}", f"is {d[key]}, outside the vocabulary of {vocab}")
    if m["prompt"]["image_token_id"] >= vocab:
        raise Invalid("prompt.image_token_id", f"is {m['prompt']['image_token_id']}, outside the vocabulary of {vocab}")
    if d["embeddings"]["shape"] != [vocab, d["hidden_size"]]:
        raise Invalid("decoder.embeddings.shape", f"is {d['embeddings']['shape']}, expected [{vocab}, {d['hidden_size']}]")
    if d["num_heads"] % d["num_kv_heads"]:
        raise Invalid("decoder.num_kv_heads", f"({d['num_kv_heads']}) does not divide num_heads ({d['num_heads']})")
    _check_roles(m)
    fused = m.get("decoder_fused")
    if fused:  # the same model; and its KV buffer (allocated at load) no longer than the model's context
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            if fused[key] != d[key]:
                raise Invalid(f"decoder_fused.{key}", f"is {fused[key]}, the decoder's is {d[key]}")
        if fused["buffer_length"] > d["max_context"]:
            raise Invalid("decoder_fused.buffer_length", f"is {fused['buffer_length']}, beyond the model's context "
                          f"of {d['max_context']}")


_ANYRES_OUTPUTS = {"base_embeds", "base_indices", "raster_embeds", "raster_indices", "raster_count"}


def _check_io(entries: list, where: str, allowed: tuple, required: set, layers: int = 0) -> None:
    """Kinds of one graph's inputs or outputs: each allowed here, none twice, every required one present, and the
    per-layer kinds present for every layer (and only with a layer)."""
    seen, names = set(), set()
    for j, io in enumerate(entries):
        kind, layer = io["kind"], io.get("layer")
        if kind not in allowed:
            raise Invalid(f"{where}[{j}].kind", f"{kind!r} is not a kind this graph has (one of {', '.join(allowed)})")
        if (kind in PER_LAYER) != (layer is not None):
            raise Invalid(f"{where}[{j}]", f"{'needs' if kind in PER_LAYER else 'must not have'} a layer")
        if layer is not None and layer >= layers:
            raise Invalid(f"{where}[{j}].layer", f"is {layer}, but the decoder has {layers} layers")
        if (kind, layer) in seen or io["name"] in names:
            raise Invalid(f"{where}[{j}]", f"repeats {kind if layer is None else f'{kind} of layer {layer}'} "
                          f"or the name {io['name']!r}")
        seen.add((kind, layer))
        names.add(io["name"])
    wanted = {(k, None) for k in required - set(PER_LAYER)}
    wanted |= {(k, n) for k in required & set(PER_LAYER) for n in range(layers)}
    missing = sorted(wanted - seen, key=str)
    if missing:
        kind, layer = missing[0]
        raise Invalid(where, f"has no {kind}" + (f" for layer {layer}" if layer is not None else ""))


def _check_form(entries: list, where: str, sizes: dict | None = None) -> None:
    """Each entry's dtype and rank are those of its kind (``graph_io.FORM``), and its static sizes those the manifest
    gives elsewhere (``sizes``: kind -> {axis: size})."""
    for j, io in enumerate(entries):
        kind, dtype, shape = io["kind"], io["dtype"], io["shape"]
        number, ranks = FORM[kind]
        if dtype not in (FLOAT_DTYPES if number == "float" else INT_DTYPES) or len(shape) not in ranks:
            raise Invalid(f"{where}[{j}]", f"is {kind}, {'a float' if number == 'float' else 'an integer'} tensor of "
                          f"rank {' or '.join(map(str, ranks))}, but is listed as {dtype} {shape}"[:300])
        for axis, size in ((sizes or {}).get(kind) or {}).items():
            got = shape[axis] if -len(shape) <= axis < len(shape) else None
            if type(got) is int and got != size:
                raise Invalid(f"{where}[{j}].shape", f"has {got} on axis {axis}, the manifest's {kind} has {size}")


def _check_names(entries: list, where: str, name_of) -> None:
    for j, io in enumerate(entries):
        expected = name_of(io["kind"], io.get("layer"))
        if expected is not None and io["name"] != expected:
            raise Invalid(f"{where}[{j}].name", f"is {io['name']!r}, but the {io['kind']}"
                          + (f" of layer {io['layer']}" if io.get("layer") is not None else "")
                          + f" is named {expected!r}"[:200])


def _family_names(m: dict):
    """``(kind, layer) -> name`` from the family's decoder templates the export recorded (``model.family.decoder_io``),
    or None: the names must follow them, so per-layer kinds cannot be permuted. Plain substitution, not
    ``str.format``, on these untrusted strings."""
    io = ((m.get("model") or {}).get("family") or {}).get("decoder_io")
    if not isinstance(io, dict):
        return None

    def name_of(kind, layer):
        template = io.get(kind)
        if not isinstance(template, str):
            return None
        return template.replace("{layer}", str(layer)) if layer is not None else template

    return name_of


def _check_roles(m: dict) -> None:
    for i, b in enumerate(m["vision"]["buckets"]):
        where = f"vision.buckets[{i}]"
        _check_io(b["inputs"], f"{where}.inputs", VISION_INPUTS, {"pixel_values"})
        outs = {io["kind"] for io in b["outputs"]}
        _check_io(b["outputs"], f"{where}.outputs", VISION_OUTPUTS,
                  _ANYRES_OUTPUTS if outs & _ANYRES_OUTPUTS else {"image_embeds", "kept_indices"})
        _check_form(b["inputs"], f"{where}.inputs")
        k = {1: b["k"]}
        sizes = {"image_embeds": k, "kept_indices": k, "deepstack_embeds": k}
        parts = {p.get("name"): p.get("k") for p in b.get("parts") or [] if isinstance(p, dict)}
        for part in ("base", "raster"):  # anyres: each part's kept slots
            if type(parts.get(part)) is int:
                sizes.update({f"{part}_embeds": {1: parts[part]}, f"{part}_indices": {1: parts[part]}})
        _check_form(b["outputs"], f"{where}.outputs", sizes)
    t = m.get("text_encoder")
    if t:
        _check_io(t["inputs"], "text_encoder.inputs", TEXT_INPUTS, set(TEXT_INPUTS))
        _check_io(t["outputs"], "text_encoder.outputs", TEXT_OUTPUTS, set(TEXT_OUTPUTS))
        _check_form(t["inputs"], "text_encoder.inputs")
        _check_form(t["outputs"], "text_encoder.outputs", {"text_embeds": {-1: t["projection_dim"]}})
    # the fused decoder's names are its builder's standard ones; the plain decoder's, the family's templates
    family_names = _family_names(m)
    for key, allowed_in in (("decoder", DECODER_INPUTS),
                            ("decoder_fused", tuple(k for k in DECODER_INPUTS if k != "position_ids"))):
        d = m.get(key)
        if not d:
            continue
        # the plain decoder may also take a family's prefill-only inputs (DeepStack), never required
        _check_io(d["inputs"], f"{key}.inputs", allowed_in + (PREFILL_INPUTS if key == "decoder" else ()),
                  set(allowed_in), d["num_layers"])
        _check_io(d["outputs"], f"{key}.outputs", DECODER_OUTPUTS, set(DECODER_OUTPUTS), d["num_layers"])
        kv = {1: d["num_kv_heads"], 3: d["head_dim"]}
        sizes = {"inputs_embeds": {-1: d["hidden_size"]}, "logits": {-1: d["vocab_size"]}, "past_key": kv,
                 "past_value": kv, "present_key": kv, "present_value": kv}
        _check_form(d["inputs"], f"{key}.inputs", sizes)
        _check_form(d["outputs"], f"{key}.outputs", sizes)
        pos = next((io for io in d["inputs"] if io["kind"] == "position_ids"), None)
        if pos is not None and len(pos["shape"]) == 3 and pos["shape"][0] not in (3, "3"):
            raise Invalid(f"{key}.inputs", f"position_ids of rank 3 must be M-RoPE's [3, B, S], got {pos['shape']}")
        names = _standard_name if key == "decoder_fused" else family_names
        if names is not None:
            _check_names(d["inputs"], f"{key}.inputs", names)
            _check_names(d["outputs"], f"{key}.outputs", names)


def _standard_name(kind: str, layer: int | None) -> str:
    """The name ONNX Runtime GenAI's model builder gives a tensor of this kind (``graph_io.standard_kind`` inverted)."""
    if kind in PER_LAYER:
        return f"{'past_key_values' if kind.startswith('past') else 'present'}.{layer}.{kind.split('_')[1]}"
    return kind


def _generic_paths(value: Any, where: str, out: list) -> None:
    """Path-named keys anywhere in the tree (including fields this schema does not know)."""
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and (k in PATH_KEYS or k.endswith(PATH_SUFFIXES)):
                if k == "files" and isinstance(v, dict):  # a files map may name paths by its keys (version 1 did)
                    out.extend((f"{sub} key", name) for name in v)
                _collect_path_values(v, sub, out)
            elif k not in ("lint", "model", "created_by"):  # free-form reports and provenance, never opened
                _generic_paths(v, sub, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _generic_paths(v, f"{where}[{i}]", out)


def _collect_path_values(value: Any, where: str, out: list) -> None:
    if isinstance(value, str):
        out.append((where, value))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _collect_path_values(v, f"{where}[{i}]", out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect_path_values(v, f"{where}.{k}", out)
    elif value is not None:
        raise Invalid(where, f"must be a file path, got {_got(value)}")


def validate(manifest: Any, record: dict | None, *, source: str = MANIFEST) -> dict:
    """Check ``manifest`` against the schema and, when ``record`` (rel -> entry) is given, that every path it names
    is a recorded file. Raises ``VlmpruneError`` with one line naming the field."""
    if not isinstance(manifest, dict):
        raise VlmpruneError(f"{source} is not a JSON object (it is a {type(manifest).__name__})", FIX)
    version = manifest.get("schema_version")
    if type(version) is int and version > SCHEMA_VERSION:
        raise VlmpruneError(
            f"bundle schema version {version} is newer than this vlmprune understands ({SCHEMA_VERSION})",
            "upgrade vlmprune on this machine or re-export with the installed version",
        )
    paths: list[tuple[str, Any]] = []
    try:
        MANIFEST_SCHEMA.check(manifest, "", paths)
        _cross_checks(manifest)
        _generic_paths(manifest, "", paths)
    except Invalid as exc:
        raise VlmpruneError(f"{source}: {exc.where} {exc.problem}", FIX) from None
    for where, rel in paths:
        check_relpath(rel, f"{source}: {where}")
        if record is not None and rel not in record:
            raise VlmpruneError(f"{source}: {where} names {rel}, which is not in the bundle's integrity record", FIX)
    return manifest


def upgrade_v1(manifest: dict) -> tuple[dict, dict]:
    """A version 1 manifest as (manifest, record). Its checksums (sha256 only, no sizes) become the record, without
    the derived outputs v1 also listed; its ``engines``/``int8`` sections are dropped (rebuild them)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise VlmpruneError(f"{MANIFEST} (schema version 1) lists no file checksums, so nothing can be verified", FIX)
    record = {}
    for rel, digest in files.items():
        if not isinstance(rel, str) or not isinstance(digest, str) or len(digest) != 64:
            raise VlmpruneError(f"{MANIFEST}: files.{_got(rel)} is not a sha256 checksum", FIX)
        if not rel.startswith(DERIVED_PREFIXES):
            record[rel] = {"sha256": digest}
    upgraded = {k: v for k, v in manifest.items() if k not in ("files", "engines", "int8")}
    return upgraded, record


# --- records of derived outputs (prune-build, prune-calibrate) ------------------------------------------------------

ENGINES_META = Obj({
    "target": Str(min_len=1, max_len=64), "precision": Str(max_len=16), "for_manifest": Str(max_len=64),
    "files": Map(Path_()), "trt_version": Opt(Str(max_len=64)), "gpu": Opt(Str(max_len=256)),
    "compute_capability": Opt(Str(max_len=16)),
}, optional=("trt_version", "gpu", "compute_capability"))

INT8_META = Obj({
    "for_manifest": Str(max_len=64), "algo": Str(max_len=32), "tool": Opt(Str(max_len=64)), "images": Int(0, 1 << 31),
    "qdq": Map(Path_()), "calibration_caches": Str(max_len=256), "accuracy": Map(),
}, optional=("tool",))


def upgrade_v2(manifest: dict) -> dict:
    """A version 1 to 3 manifest (version 1 after ``upgrade_v1``) read as the current version: a version 1 or 2
    graph's entries get the kinds of the fixed names those versions wrote, and the family's fp32 scopes move to
    ``vision.fp32_scopes``; the family key comes from the recorded declaration where there is one. A copy; the file
    is not touched (its checksum stays valid)."""
    import copy

    m = copy.deepcopy(manifest)
    recorded = (m.get("model") or {}).get("family") if isinstance(m.get("model"), dict) else None
    if "family" not in m and isinstance(recorded, dict) and isinstance(recorded.get("model_type"), str):
        m["family"] = recorded.get("key") or recorded["model_type"]
    if type(m.get("schema_version")) is int and m["schema_version"] >= 3:  # kinds recorded already
        m["schema_version"] = SCHEMA_VERSION
        return m
    vision = m.get("vision")
    buckets = vision.get("buckets") if isinstance(vision, dict) else None
    graphs = [*(buckets if isinstance(buckets, list) else []), m.get("text_encoder"), m.get("decoder"),
              m.get("decoder_fused")]
    for g in graphs:
        if isinstance(g, dict):
            for key in ("inputs", "outputs"):
                if isinstance(g.get(key), list):
                    add_legacy_kinds(g[key])
    if isinstance(vision, dict) and "fp32_scopes" not in vision:  # version 2 recorded them with the family only
        scopes = ((m.get("model") or {}).get("family") or {}).get("fp32_scopes")
        if scopes is not None:
            vision["fp32_scopes"] = scopes  # validated as the current version's field
    m["schema_version"] = SCHEMA_VERSION
    return m


def validate_meta(meta: Any, schema: Obj, record: dict, source: str) -> dict:
    paths: list = []
    try:
        schema.check(meta, "meta", paths)
        if schema is ENGINES_META and not meta["files"]:
            raise Invalid("meta.files", "is empty")
    except Invalid as exc:
        raise VlmpruneError(f"{source}: {exc.where} {exc.problem}", "rebuild it") from None
    for where, rel in paths:
        check_relpath(rel, f"{source}: {where}")
        if rel not in record:
            raise VlmpruneError(f"{source}: {where} names {rel}, which is not in its integrity record", "rebuild it")
    return meta
