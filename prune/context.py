"""What a pruning method may read about one image view.

A method module never sees the model: it reads tensors from a context. The model-backed context (built by the
exporter) computes each tensor lazily, so the branches a method does not use are never traced into its graph.
``TensorContext`` serves tests and users who already hold the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class ScoreContext:
    """Interface: the tensors a method may ask for. Shapes: B batch, H heads, T = N (+1 with CLS), N patches."""

    has_cls: bool

    @property
    def patches(self) -> Tensor:  # [B, N, C] patch features of the feature layer (pre-projector)
        raise NotImplementedError

    @property
    def projected(self) -> Tensor:  # [B, N, D] post-projector features (LLM width)
        raise NotImplementedError

    def qk(self) -> tuple[Tensor, Tensor, float]:  # q, k [B, H, T, d] of the scoring layer, and the logit scale
        raise NotImplementedError

    @property
    def joint(self) -> Tensor:  # [B, N, E] patch embeddings in the CLIP joint space
        raise NotImplementedError

    @property
    def text_embeds(self) -> Tensor:  # [B, E] L2-normalised CLIP text embedding of the prompt
        raise NotImplementedError


@dataclass
class TensorContext(ScoreContext):
    """A context over tensors the caller already has; asking for a missing one is an error."""

    has_cls: bool = True
    patches_: Tensor | None = None
    projected_: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    scale: float | None = None
    joint_: Tensor | None = None
    text_embeds_: Tensor | None = None

    def _need(self, value, name):
        if value is None:
            raise ValueError(f"this pruning method needs `{name}`, which the context does not hold")
        return value

    @property
    def patches(self):
        return self._need(self.patches_, "patches")

    @property
    def projected(self):
        return self._need(self.projected_, "projected")

    def qk(self):
        q = self._need(self.q, "q")
        k = self._need(self.k, "k")
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return q, k, scale

    @property
    def joint(self):
        return self._need(self.joint_, "joint")

    @property
    def text_embeds(self):
        return self._need(self.text_embeds_, "text_embeds")


def head_mean_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Softmax attention probabilities averaged over heads: [B, H, T, d] x2 -> [B, T, T]."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.softmax(logits.float(), dim=-1).mean(1)


def cls_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Attention the CLS query (token 0) gives to each patch, averaged over heads: [B, N].

    Only the CLS row is computed (1 x T per head), never the full T x T map.
    """
    logits = torch.matmul(q[:, :, 0:1, :], k.transpose(-1, -2)) * scale  # [B, H, 1, T]
    probs = torch.softmax(logits.float(), dim=-1).mean(1)  # [B, 1, T]
    return probs[:, 0, 1:]
