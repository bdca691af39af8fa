"""The adapter interface: everything export and pruning need from a vision-language model.

Data flows one way: adapter -> pruning module -> exporter -> bundle. An adapter exposes the model in pieces that
can be traced separately (the vision tower cut at the feature layer, the scoring layer's side branch, the
projector, the token-embedding table, the decoder), plus the constants the runtime needs (preprocessing, geometry,
tokenizer and chat template). The pieces are per *view*: LLaVA-1.5 has one view; LLaVA-NeXT will add a base view
plus the high-resolution crops, Qwen2.5-VL one merged grid without CLS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmprune.prune.context import ScoreContext, cls_attention


@dataclass(frozen=True)
class Preprocessing:
    """Image preprocessing constants, enough to reproduce the model's image processor with numpy + Pillow."""

    resize_shortest_edge: int
    crop_size: tuple[int, int]  # (height, width)
    resample: str  # Pillow filter name: "bicubic", "bilinear", ...
    do_resize: bool
    do_center_crop: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    do_convert_rgb: bool = True
    kind: str = "clip"  # "clip": resize + center crop; "anyres": base view + crops of the best pinpoint (LLaVA-NeXT)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: the (height, width) canvases crops are cut from

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind == "clip":  # single-view bundles keep the fields they always had
            del d["kind"], d["grid_pinpoints"]
        else:
            d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return d


@dataclass(frozen=True)
class ViewSpec:
    """One image view the vision graph sees: its patch grid and whether the encoder adds a CLS token."""

    name: str
    image_size: tuple[int, int]  # (height, width) in pixels
    grid: tuple[int, int]  # (h, w) patch tokens after any merge
    has_cls: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class VisionSpec:
    patch_size: int
    hidden_size: int
    num_heads: int
    num_layers: int  # layers in the checkpoint
    feature_layer: int  # index into hidden_states as the model config gives it (e.g. -2)
    layers_run: int  # encoder layers actually run: the feature layer's output, never the unused ones
    views: tuple[ViewSpec, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    image_token: str
    image_token_id: int
    chat_template: str | None


@dataclass
class ClipText:
    """GridPrune's text side: CLIP's text tower and projections (the vision tower is the VLM's own)."""

    model: Any  # transformers CLIPModel (vision tower dropped after loading)
    tokenizer: Any
    path: Path
    projection_dim: int
    max_length: int


class VLMAdapter(ABC):
    """Model-specific access for export and pruning. ``.model`` is the underlying ``transformers`` model."""

    arch: str = ""
    family: Any = None  # the registry's Family (models/registry.py), set by load_model
    model: Any
    processor: Any
    tokenizer: Any
    path: Path
    source: str  # the preset name, folder or hub id the user gave
    clip: ClipText | None

    preprocessing: Preprocessing
    vision: VisionSpec
    text: TextSpec

    # --- vision, per view ------------------------------------------------------------------------------------
    @abstractmethod
    def hidden_before_scoring(self, pixel_values: Tensor) -> Tensor:
        """[B, T, C]: the hidden state entering the scoring layer (the feature layer)."""

    @abstractmethod
    def scoring_layer(self, hidden: Tensor) -> Tensor:
        """[B, T, C]: the feature layer's output, all tokens, from ``hidden_before_scoring``'s output."""

    @abstractmethod
    def scoring_qk(self, hidden: Tensor) -> tuple[Tensor, Tensor, float]:
        """Side branch: the scoring layer's queries and keys [B, H, T, d] recomputed from its input, and the scale.

        Pruning reads attention here, so the encoder's own attention never has to output its probabilities and
        stays fusable."""

    @abstractmethod
    def select_patches(self, features: Tensor) -> Tensor:
        """[B, N, C]: the patch tokens the projector receives (CLS dropped)."""

    @abstractmethod
    def project(self, patches: Tensor) -> Tensor:
        """[B, K, D]: the multimodal projector."""

    @abstractmethod
    def reference_image_features(self, pixel_values: Tensor) -> Tensor:
        """[B, N, D] through the library's own forward, for parity checks of the pieces above."""

    # --- GridPrune's joint space ----------------------------------------------------------------------------
    def joint_embeds(self, patches: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.arch}: no CLIP joint space")

    def text_embeds(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.arch}: no CLIP text tower")

    # --- language side ---------------------------------------------------------------------------------------
    @abstractmethod
    def embedding_table(self) -> Tensor:
        """[V, D] token embeddings (the runtime builds ``inputs_embeds`` from it)."""

    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack taking ``inputs_embeds`` (no LM head)."""

    @abstractmethod
    def lm_head(self) -> torch.nn.Module:
        """Hidden state -> vocabulary logits."""

    def score_context(self, hidden: Tensor, features: Tensor, text_embeds: Tensor | None = None) -> "AdapterContext":
        return AdapterContext(self, hidden, features, text_embeds)

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "source": self.source,
            "vision": {**asdict(self.vision), "views": [asdict(v) for v in self.vision.views]},
            "text": {k: v for k, v in asdict(self.text).items() if k != "chat_template"},
            # the registry's declaration: capabilities, fp32 scopes, decoder I/O, runtime recipe
            **({"family": self.family.to_dict()} if self.family is not None else {}),
        }


@dataclass
class AdapterContext(ScoreContext):
    """A ``ScoreContext`` over one view of a real model. Each tensor is computed on first use, so a method's graph
    holds only the branches it reads (FoPru's never contains the projector over all N tokens)."""

    adapter: VLMAdapter
    hidden: Tensor
    features: Tensor
    text: Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def has_cls(self) -> bool:  # type: ignore[override]
        return self.adapter.vision.views[0].has_cls

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def patches(self):
        return self._get("patches", lambda: self.adapter.select_patches(self.features))

    @property
    def projected(self):
        return self._get("projected", lambda: self.adapter.project(self.patches))

    def qk(self):
        return self._get("qk", lambda: self.adapter.scoring_qk(self.hidden))

    @property
    def joint(self):
        return self._get("joint", lambda: self.adapter.joint_embeds(self.patches))

    @property
    def text_embeds(self):
        if self.text is None:
            raise ValueError("this method needs text_embeds (the CLIP embedding of the prompt)")
        return self.text

    def cls_attention(self) -> Tensor:
        q, k, scale = self.qk()
        return cls_attention(q, k, scale)
