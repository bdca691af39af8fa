"""The torch modules that are traced to ONNX: one vision graph per budget bucket, the CLIP text encoder."""

from __future__ import annotations

from torch import Tensor, nn

from vlmprune.models.adapter import VLMAdapter
from vlmprune.prune.base import PruneModule


class BucketVisionGraph(nn.Module):
    """``pixel_values [1, 3, H, W]`` (+ ``text_embeds [1, E]`` for text-guided methods) ->
    ``image_embeds [1, K, D]`` (post-projector, kept tokens in ascending order), ``kept_indices [1, K]``.

    The encoder runs only up to the feature layer; the method reads attention from a side branch over the hidden
    state entering that layer, so the encoder's attention is never asked for its probabilities. Methods of stage
    ``pre`` gather before the projector, which then runs on K tokens only.
    """

    def __init__(self, adapter: VLMAdapter, method: PruneModule):
        super().__init__()
        self.adapter = adapter
        self.method = method
        # Registered so that .to()/.half() reach the weights the graph uses.
        self.model = adapter.model
        self.clip = adapter.clip.model if adapter.clip is not None else None

    def forward(self, pixel_values: Tensor, text_embeds: Tensor | None = None):
        hidden = self.adapter.hidden_before_scoring(pixel_values)
        features = self.adapter.scoring_layer(hidden)
        ctx = self.adapter.score_context(hidden, features, text_embeds)
        indices, tokens = self.method(ctx)
        if self.method.stage == "pre":
            tokens = self.adapter.project(tokens)
        return tokens.float(), indices


class TextEncoderGraph(nn.Module):
    """``input_ids [1, L]`` -> L2-normalised ``text_embeds [1, E]`` (CLIP ``get_text_features``)."""

    def __init__(self, adapter: VLMAdapter):
        super().__init__()
        self.adapter = adapter
        self.clip = adapter.clip.model

    def forward(self, input_ids: Tensor):
        return self.adapter.text_embeds(input_ids)
