"""The model-family registry, keyed by the checkpoint's ``model_type``.

Each family is one adapter file under ``models/`` that declares a ``FAMILY``: the transformers class that loads it,
its scoring capabilities (CLS or not, the layer with global attention, a CLIP joint space or not), the fp32 scopes
for precision pinning, the decoder I/O, and the runtime recipe (preprocessing kind, stitch layout, positions kind).
Everything here is plain data, so a method's needs can be checked against a family from ``config.json`` alone,
before any weights load. Adding a family: one adapter file, one line in ``_ADAPTER_MODULES``, a tiny preset.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

from vlmprune.errors import VlmpruneError

# Adapter files, imported on first use (they import torch).
_ADAPTER_MODULES = ("vlmprune.models.llava", "vlmprune.models.llava_next", "vlmprune.models.qwen2_5_vl")
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
class Family:
    model_type: str
    name: str  # shown to users, e.g. "LLaVA-NeXT"
    transformers_class: str  # attribute of the ``transformers`` package
    adapter: str  # "module:Class" of the adapter
    capabilities: Capabilities
    recipe: RuntimeRecipe
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def adapter_class(self):
        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)

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


_FAMILIES: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    """model_type -> Family, from every adapter file."""
    global _FAMILIES
    if _FAMILIES is None:
        found = {}
        for module in _ADAPTER_MODULES:
            fam = importlib.import_module(module).FAMILY
            found[fam.model_type] = fam
        _FAMILIES = found
    return _FAMILIES


def family_for(model_type: str, where: str = "config.json") -> Family:
    fams = families()
    if model_type in fams:
        return fams[model_type]
    supported = ", ".join(f"{f.name} ({k})" for k, f in fams.items())
    if model_type in PLANNED:
        raise VlmpruneError(f"{PLANNED[model_type]} ({model_type}) is not supported by this version of vlmprune yet",
                            f"supported architectures: {supported}")
    raise VlmpruneError(f"unknown model type {model_type!r} in {where}", f"supported architectures: {supported}")
