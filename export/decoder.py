"""The LLM decoder with a KV cache that takes ``inputs_embeds``, and the token-embedding table.

I/O follows the naming of optimum and ONNX Runtime GenAI by default (a family's ``decoder_io`` templates may differ): ``inputs_embeds [B, S, D]``, ``attention_mask [B, P+S]``,
``position_ids [B, S]``, ``past_key_values.{i}.key|value [B, Hkv, P, Dh]`` -> ``logits [B, S, V]``,
``present.{i}.key|value [B, Hkv, P+S, Dh]``; S and P dynamic (P may be 0 for the prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmprune.models.adapter import VLMAdapter
from vlmprune.models.registry import DecoderIO


def decoder_io(io: DecoderIO, num_layers: int, extra: tuple = ()) -> tuple[list[str], list[str], dict, dict]:
    """The graph's input and output names from the family's templates (``FAMILY.decoder_io``), the kind of each
    (written into the manifest, which the runtime reads them from) and the dynamic axes. ``extra``: the decoder
    module's prefill-only inputs after the cache (``DecoderGraph.extra_inputs``: name, kind, dynamic axes)."""
    positions_axes = {1: "batch", 2: "sequence"} if io.position_rank == 3 else {0: "batch", 1: "sequence"}
    inputs = [io.inputs_embeds, io.attention_mask, io.position_ids]
    outputs = [io.logits]
    kinds = {io.inputs_embeds: "inputs_embeds", io.attention_mask: "attention_mask", io.position_ids: "position_ids",
             io.logits: "logits"}
    axes = {io.inputs_embeds: {0: "batch", 1: "sequence"}, io.attention_mask: {0: "batch", 1: "total_sequence"},
            io.position_ids: positions_axes, io.logits: {0: "batch", 1: "sequence"}}
    for i in range(num_layers):
        for kv in ("key", "value"):
            past = getattr(io, f"past_{kv}").format(layer=i)
            present = getattr(io, f"present_{kv}").format(layer=i)
            inputs.append(past)
            outputs.append(present)
            kinds[past], kinds[present] = (f"past_{kv}", i), (f"present_{kv}", i)
            axes[past], axes[present] = {0: "batch", 2: "past_sequence"}, {0: "batch", 2: "total_sequence"}
    for name, kind, dyn in extra:
        inputs.append(name)
        kinds[name], axes[name] = kind, dict(dyn)
    # a template without {layer}, or two kinds on one name, would make names collide: refuse at export, not at run
    if len(kinds) != len(inputs) + len(outputs):
        raise ValueError(f"the decoder I/O templates {io} give colliding tensor names")
    return inputs, outputs, kinds, axes


class DecoderGraph(nn.Module):
    """Flat-tensor wrapper around the adapter's decoder so it traces with the cache as plain inputs/outputs."""

    # (name, kind, dynamic axes) of inputs after the cache that only the prefill feeds (``graph_io.PREFILL_INPUTS``);
    # ``forward`` takes them after ``*past``, ``example_inputs`` returns them last
    extra_inputs: tuple = ()

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
