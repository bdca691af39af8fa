"""Qwen2.5-VL's KV-cache decoder: the exporter's ``DecoderGraph`` with M-RoPE ``position_ids [3, B, S]`` (the
family's ``decoder_io.position_rank``); transformers' Qwen2.5-VL text model takes the three position rows itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .decoder import DecoderGraph, decoder_dynamic_axes, decoder_io_names
from .onnx_io import WeightsFile, attach_weights, export_onnx, save_graph


class QwenDecoderGraph(DecoderGraph):
    def example_inputs(self, batch: int = 1, seq: int = 3, past: int = 5, dtype=torch.float32):
        embeds, mask, positions, *cache = super().example_inputs(batch, seq, past, dtype)
        # three different rows, so the trace cannot mistake them for one broadcast row
        rows = torch.stack([positions, positions + 1, positions + 2])
        return (embeds, mask, rows, *cache)


def qwen_decoder_axes(num_layers: int) -> dict:
    axes = decoder_dynamic_axes(num_layers)
    axes["position_ids"] = {1: "batch", 2: "sequence"}
    return axes


def export_qwen_decoder(adapter, path: Path, weights_path: Path, opset: int = 17):
    """Write ``path`` (graph) and ``weights_path`` (its weights); returns the ONNX model (no weights loaded)."""
    decoder = QwenDecoderGraph(adapter).eval()
    dtype = next(decoder.lm.parameters()).dtype
    names_in, names_out = decoder_io_names(adapter.text.num_layers)
    scratch = Path(path).parent / ".decoder-scratch"
    scratch.mkdir(exist_ok=True)
    try:
        model = export_onnx(decoder, decoder.example_inputs(dtype=dtype), scratch / "decoder.onnx",
                            input_names=names_in, output_names=names_out,
                            dynamic_axes=qwen_decoder_axes(adapter.text.num_layers), opset=opset,
                            weights_as_inputs=True)
        with WeightsFile(weights_path) as weights:
            attach_weights(model, dict(decoder.named_parameters()), weights)
            weights.add_model(model, scratch)
        save_graph(model, path)
    finally:
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
    return model


def save_embeddings(adapter, path: Path) -> None:
    np.save(path, adapter.embedding_table().detach().float().numpy())
