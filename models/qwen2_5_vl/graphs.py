"""Qwen2.5-VL's traced vision graph: one per static image size and budget bucket.

``pixel_values [N, C*T*P*P]`` (the processor's flattened patches) -> ``image_embeds [1, K, D]`` (post-merger, LLM
width), ``kept_indices [1, K]`` (ascending raster indices of the merged grid). The encoder is
``models/qwen_vision.QwenVisionStatic`` (window order, rotary tables and window spans as constants); the selection
sits in the ``method`` submodule, so its ONNX nodes fall under the family's ``method/`` fp32 scope. Rules per method
are those of ``specs/methods.md`` ("Qwen2.5-VL"):

- FoPru: head-mean attention probabilities (or logits) of the last full-attention block over the pre-merge
  patches, ``s1``/``s2`` per patch (no CLS), then the mean over each 2x2 merge group; rank or row strategy on the
  merged grid;
- G-Prune, l2norm: on the post-merger features, as on LLaVA;
- GridPrune: relevance from an auxiliary CLIP (``--clip``) on the image at its own input size, resampled onto the
  merged grid; saliency from the attention each merged token receives in the last full-attention block;
- pool: 2x2 average pooling of the merged grid (K = N/4); none: every merged token.

GridPrune graphs take ``clip_pixel_values [1, 3, S, S]`` (the whole image resized to the CLIP's square input, the
same stretched view as the bucket's, so the two maps cover the same pixels) and ``text_embeds [1, E]``.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlmprune.errors import VlmpruneError
from vlmprune.prune import get_method
from vlmprune.prune.context import TensorContext
from vlmprune.prune.fopru import rows_for, scores_from_qk, select_rows
from vlmprune.prune.select import gather_tokens, topk_ascending

METHODS = ("none", "fopru", "gprune", "gridprune", "l2norm", "pool")


class QwenFoPru(nn.Module):
    """FoPru over pre-merge patches of the last full-attention block, scored per merged token."""

    name = "fopru"

    def __init__(self, static, k: int, strategy: str = "rank", scores: str = "probs"):
        super().__init__()
        self._static = [static]  # not a submodule: the encoder's weights belong to the graph, not to the method
        self.k = int(k)
        self.grid = static.merged_grid
        self.strategy = strategy
        self.scores = scores
        if strategy == "row":
            self.rows = rows_for(self.k, self.grid)
            if self.rows * self.grid[1] != self.k:
                raise ValueError(f"row strategy returns whole rows of {self.grid[1]}, not K={self.k}")

    def merged_scores(self, scoring_input: Tensor) -> Tensor:
        """[1, N/4]: the per-patch significance (window order undone), averaged over each 2x2 merge group."""
        st = self._static[0]
        q, k, scale = st.scoring_qk(scoring_input)
        return st.group_mean(scores_from_qk(q, k, scale, has_cls=False, scores=self.scores))

    def forward(self, scoring_input: Tensor, merged: Tensor) -> tuple[Tensor, Tensor]:
        sig = self.merged_scores(scoring_input)
        if self.strategy == "row":
            indices = select_rows(sig, self.grid, self.rows)
        else:
            indices = topk_ascending(sig, self.k)
        return indices, gather_tokens(merged, indices)


class QwenGridPrune(nn.Module):
    """GridPrune on the merged grid: relevance from the auxiliary CLIP's patch map resampled (bilinear,
    align_corners=False) onto the merged grid; saliency the attention each merged token receives in the last
    full-attention block (mean over queries and heads, averaged over its 2x2 group, divided by its maximum)."""

    name = "gridprune"

    def __init__(self, static, adapter, k: int, zones: int = 4, alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        from vlmprune.prune.gridprune import zone_ids

        self._static = [static]
        self._adapter = [adapter]
        self.k = int(k)
        self.grid = static.merged_grid
        zone_ids(self.grid, zones)  # validates the layout now rather than at trace time
        self.zones, self.alpha, self.tau = int(zones), float(alpha), float(tau)

    def scores(self, scoring_input: Tensor, clip_pixels: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """(relevance r [1, M], fused score s [1, M]) on the merged grid."""
        import torch
        import torch.nn.functional as F

        st = self._static[0]
        q, k, scale = st.scoring_qk(scoring_input)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scale, dim=-1, dtype=torch.float32)
        received = st.group_mean(probs.mean(2).mean(1))  # [1, M]
        a = received / torch.clamp(received.max(-1, keepdim=True).values, min=1e-30)
        rmap = self._adapter[0].clip_relevance(clip_pixels, text_embeds)  # [1, hc, wc]
        r = F.interpolate(rmap.unsqueeze(1), size=self.grid, mode="bilinear", align_corners=False).flatten(1)
        r = torch.clamp(torch.where(r == r, r, torch.full_like(r, -1.0)), -1.0, 1.0)
        return r, (1.0 - self.alpha) * (r + 1.0) * 0.5 + self.alpha * a

    def forward(self, scoring_input: Tensor, merged: Tensor, clip_pixels: Tensor, text_embeds: Tensor):
        from vlmprune.prune.gridprune import gridprune_from_scores

        r, s = self.scores(scoring_input, clip_pixels, text_embeds)
        indices = gridprune_from_scores(r, s, self.k, self.grid, self.zones, self.tau)
        return indices, gather_tokens(merged, indices)


class QwenMergedMethod(nn.Module):
    """A method of ``prune/`` on the merged grid, with the post-merger features as both its ``patches`` and its
    ``projected`` tokens (Qwen's merger is the projector, and ``pool`` averages merged tokens)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.name = module.name

    def forward(self, scoring_input: Tensor, merged: Tensor) -> tuple[Tensor, Tensor]:
        return self.module(TensorContext(has_cls=False, patches_=merged, projected_=merged))


def build_method(static, name: str, k: int, options: dict, adapter=None) -> nn.Module:
    if name == "fopru":
        return QwenFoPru(static, k, **options)
    if name == "gridprune":
        return QwenGridPrune(static, adapter, k, **options)
    if name not in METHODS:
        raise VlmpruneError(f"method {name!r} is not available for Qwen2.5-VL yet",
                            f"choose one of: {', '.join(METHODS)}")
    return QwenMergedMethod(get_method(name).build(k, static.merged_grid, False, **options))


class QwenVisionGraph(nn.Module):
    def __init__(self, adapter, method_name: str, k: int, options: dict | None = None):
        super().__init__()
        self.static = adapter.static()
        self.method = build_method(self.static, method_name, k, dict(options or {}), adapter)
        self.k = int(getattr(self.method, "k", None) or getattr(self.method.module, "k"))
        self.uses_text = method_name == "gridprune"
        if self.uses_text:  # registered so that the auxiliary CLIP's weights are the graph's
            self.clip = adapter.clip.model

    def forward(self, pixel_values: Tensor, clip_pixel_values: Tensor | None = None,
                text_embeds: Tensor | None = None):
        scoring_input, merged = self.static.run(pixel_values)
        extra = (clip_pixel_values, text_embeds) if self.uses_text else ()
        indices, tokens = self.method(scoring_input, merged.unsqueeze(0), *extra)
        return tokens.float(), indices
