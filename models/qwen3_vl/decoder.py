"""Qwen3-VL's KV-cache decoder: Qwen2.5-VL's (M-RoPE ``position_ids [3, B, S]``) plus DeepStack's prefill inputs,
``deepstack_embeds [levels, K, D]`` and ``deepstack_positions [K]`` (``graph_io.PREFILL_INPUTS``): level ``l``'s
rows are added to the hidden states after decoder layer ``l`` at the sequence positions given, as transformers'
``Qwen3VLTextModel._deepstack_process`` adds them at its ``visual_pos_masks``. At a generated token K is 0 and
nothing is added.

transformers adds them by boolean-mask indexing (data-dependent shapes in a graph); here the rows are scattered
onto the sequence by a one-hot ``[S, K]`` MatMul, exact (one 1.0 per row, the rest 0.0) and empty when K is 0, and
added to every position. The positions index the sequence of batch row 0 and the rows are broadcast over the batch:
the runtime runs batch 1."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from vlmprune.models.qwen2_5_vl.decoder import QwenDecoderGraph


@contextlib.contextmanager
def dense_deepstack(lm):
    """The text model adding dense ``[B, S, D]`` DeepStack rows to every position, while tracing or checking (the
    instance attribute shadows the class's method, and is removed after, so transformers' own forward is intact)."""
    lm._deepstack_process = lambda hidden, mask, rows: hidden + rows.to(hidden.dtype)
    try:
        yield
    finally:
        del lm._deepstack_process


class Qwen3DecoderGraph(QwenDecoderGraph):
    extra_inputs = (("deepstack_embeds", "deepstack_embeds", {1: "visual_tokens"}),
                    ("deepstack_positions", "deepstack_positions", {0: "visual_tokens"}))

    def __init__(self, adapter):
        super().__init__(adapter)
        self.levels = adapter.deepstack_levels

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, *rest: Tensor):
        from transformers import DynamicCache

        past, extra = rest[:2 * self.num_layers], rest[2 * self.num_layers:]
        if extra:
            rows, where = extra
        else:  # a text-only call (validation's PyTorch reference): no DeepStack rows
            rows = inputs_embeds.new_zeros(self.levels, 0, inputs_embeds.shape[-1])
            where = torch.zeros(0, dtype=torch.int64)
        seq = inputs_embeds.shape[1]
        onehot = (torch.arange(seq, dtype=torch.int64)[:, None] == where[None, :]).to(rows.dtype)  # [S, K]
        dense = [torch.matmul(onehot, rows[level]).unsqueeze(0) for level in range(self.levels)]  # [1, S, D] each
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], config=self.config)
        with dense_deepstack(self.lm):
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, return_dict=True, deepstack_visual_embeds=dense)
        logits = self.head(out.last_hidden_state).float()
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)

    def example_inputs(self, batch: int = 1, seq: int = 3, past: int = 5, dtype=torch.float32):
        g = torch.Generator().manual_seed(1)
        rows = torch.randn(self.levels, 2, self.adapter.text.hidden_size, generator=g, dtype=dtype)
        # two of the three new tokens are visual: the trace sees a K that is neither S nor 1
        return (*super().example_inputs(batch, seq, past, dtype), rows, torch.tensor([0, 2], dtype=torch.int64))
