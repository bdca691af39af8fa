"""Qwen3-VL's traced vision graph: one per static image size and budget bucket.

``pixel_values [N, C*T*P*P]`` -> ``image_embeds [1, K, D]`` (post-merger), ``deepstack_embeds [levels, K, D]`` (the
DeepStack mergers' features of the same kept tokens, gathered with the same indices) and ``kept_indices [1, K]``
(ascending raster indices of the merged grid). The methods are Qwen2.5-VL's (``models/qwen2_5_vl/graphs.py``,
rules in ``docs/methods.md``): FoPru on the last block's attention over pre-merge patches averaged per merge group,
G-Prune/l2norm/pool/none on the merged tokens, GridPrune with the auxiliary CLIP; every block of this encoder
attends globally, so "the last full-attention block" is the last block.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlmprune.models.qwen2_5_vl.graphs import METHODS, build_method  # noqa: F401  (the family's methods)
from vlmprune.prune.select import gather_tokens


class Qwen3VisionGraph(nn.Module):
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
        scoring_input, merged, deepstack = self.static.run(pixel_values)
        extra = (clip_pixel_values, text_embeds) if self.uses_text else ()
        indices, tokens = self.method(scoring_input, merged.unsqueeze(0), *extra)
        levels = gather_tokens(deepstack, indices.expand(deepstack.shape[0], -1))  # the same kept tokens per level
        return tokens.float(), levels.float(), indices
