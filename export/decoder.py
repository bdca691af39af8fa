"""The LLM decoder with a KV cache that takes ``inputs_embeds``, and the token-embedding table.

I/O follows the naming of optimum and ONNX Runtime GenAI: ``inputs_embeds [B, S, D]``, ``attention_mask [B, P+S]``,
``position_ids [B, S]``, ``past_key_values.{i}.key|value [B, Hkv, P, Dh]`` -> ``logits [B, S, V]``,
``present.{i}.key|value [B, Hkv, P+S, Dh]``; S and P dynamic (P may be 0 for the prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmprune.models.adapter import VLMAdapter


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def decoder_dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total_sequence"}
    return axes


class DecoderGraph(nn.Module):
    """Flat-tensor wrapper around the adapter's decoder so it traces with the cache as plain inputs/outputs."""

    def __init__(self, adapter: VLMAdapter):
        super().__init__()
        self.adapter = adapter
        self.lm = adapter.language_model()
        self.head = adapter.lm_head()
        self.num_layers = adapter.text.num_layers
        self.config = adapter.model.config.text_config

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs, config=self.config)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        logits = self.head(out.last_hidden_state).float()
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)

    def example_inputs(self, batch: int = 1, seq: int = 3, past: int = 5, dtype=torch.float32):
        t = self.adapter.text
        g = torch.Generator().manual_seed(0)
        embeds = torch.randn(batch, seq, t.hidden_size, generator=g, dtype=dtype)
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        positions = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, -1)
        cache = []
        for _ in range(t.num_layers):
            for _ in range(2):
                cache.append(torch.randn(batch, t.num_kv_heads, past, t.head_dim, generator=g, dtype=dtype))
        return (embeds, mask, positions, *cache)
