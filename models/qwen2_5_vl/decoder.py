"""Qwen2.5-VL's KV-cache decoder: the exporter's ``DecoderGraph`` with M-RoPE ``position_ids [3, B, S]`` (the
family's ``decoder_io.position_rank``; ``exporter._decoder_module`` picks it); transformers' Qwen2.5-VL text model
takes the three position rows itself."""

from __future__ import annotations

import torch

from vlmprune.export.decoder import DecoderGraph


class QwenDecoderGraph(DecoderGraph):
    def example_inputs(self, batch: int = 1, seq: int = 3, past: int = 5, dtype=torch.float32):
        embeds, mask, positions, *cache = super().example_inputs(batch, seq, past, dtype)
        # three different rows, so the trace cannot mistake them for one broadcast row
        rows = torch.stack([positions, positions + 1, positions + 2])
        return (embeds, mask, rows, *cache)


