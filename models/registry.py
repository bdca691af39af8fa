"""The model-family registry: which families exist, found by the checkpoint's ``model_type`` at export and by the
manifest's ``family`` key at run time.

A family is one folder ``models/<key>/`` whose ``__init__.py`` declares a ``FAMILY`` (plain data, torch-free): the
transformers class, the scoring capabilities, the fp32 scopes, the decoder I/O, its presets, its family-only export
options, and the dotted names of its parts: the adapter and export hooks (torch) and the runtime hooks
(torch-free). The registry imports those parts by name when they are first needed, so nothing below the family
folders imports a family, and the runtime never pulls torch in through here. Adding a family: its folder, and one
line in ``FAMILY_PACKAGES`` (or, for a family kept outside this package, its module in ``VLMPRUNE_FAMILIES``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from vlmprune.errors import VlmpruneError

# One line per family: its folder's package (torch-free; its parts are named in its FAMILY and imported on use).
FAMILY_PACKAGES = ("vlmprune.models.llava", "vlmprune.models.llava_next", "vlmprune.models.qwen2_5_vl",
                   "vlmprune.models.qwen3_vl")
# Families kept outside this package (a plugin, or a test's copy): comma-separated module names declaring a FAMILY.
PLUGIN_ENV = "VLMPRUNE_FAMILIES"
# Families known but not built yet: they say so rather than failing deep inside transformers.
PLANNED = {"llava_onevision": "LLaVA-OneVision"}


@dataclass(frozen=True)
class Capabilities:
    """What a pruning method may read from this family's vision encoder."""

    has_cls: bool  # a CLS token (GridPrune's saliency is CLS attention)
    global_attention_layer: str  # the layer whose attention is global: "feature" (the feature layer itself) or a name
    clip_joint_space: bool  # patch embeddings project into CLIP's joint text-image space (GridPrune's relevance)
    # GridPrune without CLS and joint space (Qwen2.5-VL, specs/methods.md): relevance from an auxiliary CLIP run on
    # the image, saliency from the attention each token receives in the global-attention layer
    auxiliary_clip: bool = False

    def provides(self) -> set[str]:
        """The method ``needs`` (see ``prune.registry.MethodSpec.needs``) this family can serve."""
        out = {"projected"}
        if self.global_attention_layer:
            out.add("attention")
        if self.clip_joint_space or self.auxiliary_clip:
            out.add("text")
        if self.has_cls or self.auxiliary_clip:  # "cls" is GridPrune's saliency; see auxiliary_clip
            out.add("cls")
        return out


@dataclass(frozen=True)
class DecoderIO:
    """Names and ranks of the KV-cache decoder graph (``export/decoder.py`` writes them, the runtime reads them)."""

    inputs_embeds: str = "inputs_embeds"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    position_rank: int = 2  # [B, S]; M-RoPE families use 3 ([3, B, S])
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    logits: str = "logits"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"


@dataclass(frozen=True)
class RuntimeRecipe:
    """Which runtime plug-ins a bundle of this family needs."""

    preprocess: str  # "clip" (resize shortest edge + center crop) or "anyres" (base view + pinpoint crops)
    layout: str  # "single_view" (K tokens replace the placeholder) or "anyres_raster" (base, then rows + newline)
    positions: str  # "1d" ([B, S] position ids) or "mrope"


@dataclass(frozen=True)
class FamilyOption:
    """A ``prune-export`` option only one family takes (``--layouts``, ``--image-size``), checked like a method's
    options: given for another family's model, it is refused in one line before the weights load."""

    flag: str  # e.g. "--layouts"
    dest: str  # the key in ExportRequest.family_options
    help: str
    parse: str = ""  # "module:function(text) -> value", torch-free; "" keeps the text
    metavar: str = "VALUE"

    def parse_value(self, text: str):
        return load(self.parse)(text) if self.parse else text


@dataclass(frozen=True)
class Family:
    model_type: str  # the checkpoint's config.json model_type
    name: str  # shown to users, e.g. "LLaVA-NeXT"
    transformers_class: str  # attribute of the ``transformers`` package
    adapter: str  # "module:Class" of the adapter (torch)
    capabilities: Capabilities
    recipe: RuntimeRecipe
    # "module:Class" of the runtime hooks (torch-free, ``runtime/family.py``'s FamilyRuntime) and of the export hooks
    # (torch, ``export/family.py``'s FamilyExport)
    runtime: str = ""
    export: str = ""
    key: str = ""  # the manifest's family key (the folder's name); "" = model_type
    # "module:function(spec, folder)" writing one of this family's presets, and the presets themselves
    preset_writer: str = ""
    presets: tuple = ()
    options: tuple[FamilyOption, ...] = ()  # family-only prune-export options
    # decoders prune-run can use for this family, and why the others are missing (shown where one is asked for)
    decoders: tuple[str, ...] = ("plain", "fused", "tensorrt")
    missing_decoders: tuple[tuple[str, str], ...] = ()
    # ONNX Runtime GenAI's builder: the architecture name its model builder knows this family's text model by
    fused_architecture: str = ""
    # prune-bench runs the ONNX Runtime GenAI and transformers peers on this family's bundles
    bench_peers: bool = False
    # positions a bundle runs with unless the user says otherwise, per method (others: default_positions)
    default_positions: str = "contiguous"
    method_positions: tuple[tuple[str, str], ...] = ()
    # Regular expressions over ONNX node names that must stay fp32 in reduced-precision engines (prune-build) and
    # be left unquantised (prune-calibrate): the pruning subgraph and every LayerNorm.
    fp32_scopes: tuple[str, ...] = (r"(^|/)method/", r"layer_?norm|layrnorm|LayerNormalization")
    # ONNX node-name scope of the scoring layer's self-attention ({layer}: its 0-based index), left unquantised by
    # prune-calibrate: the side branch reads its Q/K, and graph optimisers merge the two (CLIP's naming by default)
    scoring_attention_scope: str = "/layers.{layer}/self_attn/"
    decoder_io: DecoderIO = field(default_factory=DecoderIO)
    # Submodules of the transformers model that form the vision side (kept fp32 at load, released after export).
    vision_modules: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")
    # "module:function(path, trust_remote_code)" loading the processor when AutoProcessor cannot ("" = AutoProcessor)
    processor_loader: str = ""

    @property
    def family_key(self) -> str:
        return self.key or self.model_type

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for private in ("presets", "options", "preset_writer"):  # tooling, not what a bundle needs to run
            d.pop(private, None)
        return d

    def adapter_class(self):
        return load(self.adapter)

    def runtime_class(self):
        return load(self.runtime) if self.runtime else load("vlmprune.runtime.family:FamilyRuntime")

    def export_hooks(self):
        return (load(self.export) if self.export else load("vlmprune.export.family:FamilyExport"))(self)

    def positions_for(self, method: str) -> str:
        return dict(self.method_positions).get(method, self.default_positions)

    def check_needs(self, method: str, needs) -> None:
        """One line when a method needs something this family's encoder does not have."""
        missing = sorted(set(needs) - self.capabilities.provides())
        if missing:
            what = {"attention": "an encoder layer with global attention", "text": "a CLIP joint text-image space",
                    "cls": "a CLS token", "projected": "post-projector features"}
            raise VlmpruneError(
                f"method {method!r} needs {', '.join(what.get(m, m) for m in missing)}, which {self.name} "
                f"({self.model_type}) does not have",
                "choose another method (prune-export --list-methods)",
            )


def load(dotted: str):
    """``"module:attribute"`` -> the attribute (a family's parts are named this way so they import on use)."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


_FAMILIES: dict[str, Family] | None = None


def _packages() -> list[str]:
    extra = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    return [*FAMILY_PACKAGES, *extra]


def families() -> dict[str, Family]:
    """family key -> Family, from every registered family package (torch-free)."""
    global _FAMILIES
    if _FAMILIES is None:
        found = {}
        for module in _packages():
            try:
                fam = importlib.import_module(module).FAMILY
            except (ImportError, AttributeError) as exc:
                raise VlmpruneError(f"family module {module!r} cannot be loaded: {exc}",
                                    f"check {PLUGIN_ENV} and the module's FAMILY declaration") from None
            found[fam.family_key] = fam
        _FAMILIES = found
    return _FAMILIES


def reset() -> None:
    """Forget the families found (after changing ``VLMPRUNE_FAMILIES``)."""
    global _FAMILIES
    _FAMILIES = None


def family_by_key(key: str, where: str = "the manifest") -> Family:
    fams = families()
    if key in fams:
        return fams[key]
    raise VlmpruneError(f"{where} names model family {key!r}, which this vlmprune does not have",
                        f"families here: {', '.join(fams)}; upgrade vlmprune or re-export the bundle")


def all_presets() -> dict:
    """preset name -> PresetSpec, over every family."""
    return {p.name: p for fam in families().values() for p in fam.presets}


def family_of_preset(name: str) -> Family:
    return next(f for f in families().values() if any(p.name == name for p in f.presets))


def family_for(model_type: str, where: str = "config.json") -> Family:
    """The family registered for a checkpoint's ``model_type`` (a later registration, e.g. a plugin, wins)."""
    fams = [f for f in families().values() if f.model_type == model_type]
    if fams:
        return fams[-1]
    fams = families()
    supported = ", ".join(f"{f.name} ({f.model_type})" for f in fams.values())
    if model_type in PLANNED:
        raise VlmpruneError(f"{PLANNED[model_type]} ({model_type}) is not supported by this version of vlmprune yet",
                            f"supported architectures: {supported}")
    raise VlmpruneError(f"unknown model type {model_type!r} in {where}", f"supported architectures: {supported}")
