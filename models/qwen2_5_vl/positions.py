"""Qwen2.5-VL's prompt with the kept image tokens and their 3-D M-RoPE positions (torch-free).

The decoder takes ``position_ids [3, B, S]`` (temporal, height, width). transformers' ``get_rope_index`` gives text
tokens the same position on all three axes, counting on from the last one; an image of ``h x w`` merged tokens
starting at position ``p`` gets ``(p, p + row, p + col)`` for the token at (row, col), and the text after it starts
at ``p + max(h, w)``. With pruning (``specs/methods.md``, "Qwen2.5-VL"), each kept token keeps its (t, h, w):

- ``original``: the text after the image starts where it would without pruning (``p + max(h, w)``);
- ``contiguous``: it starts right after the largest position among the kept tokens.

Generation continues one position per token on all three axes, as ``generate`` does with the rope deltas.
Written by hand because the runtime may not import transformers; ``tests/test_qwen2_5_vl.py`` checks it against
``get_rope_index``.
"""

from __future__ import annotations

import numpy as np

from vlmprune.errors import VlmpruneError

MODES = ("original", "contiguous")


def image_positions(start: int, grid: tuple[int, int], kept: np.ndarray) -> np.ndarray:
    """[3, K]: the (t, h, w) positions of the kept merged tokens (raster indices of the ``grid``) of an image whose
    first position is ``start``."""
    h, w = grid
    kept = np.asarray(kept, np.int64).reshape(-1)
    rows, cols = kept // w, kept % w
    return np.stack([np.full_like(kept, start), start + rows, start + cols])


def prompt_positions(ids: list[int], image_token_id: int, grid: tuple[int, int], kept: np.ndarray,
                     mode: str = "original") -> tuple[np.ndarray, int]:
    """``(positions [3, S], next_position)`` for the prompt ``ids`` whose one ``image_token_id`` is replaced by the
    K kept tokens: S = len(ids) - 1 + K; ``next_position`` is the first generated token's position."""
    if mode not in MODES:
        raise VlmpruneError(f"unknown positions mode {mode!r} for an M-RoPE model", f"use one of {', '.join(MODES)}")
    where = ids.index(image_token_id)
    before = np.arange(where, dtype=np.int64)
    image = image_positions(where, grid, kept)
    if mode == "original":
        after_start = where + max(grid)
    else:
        after_start = int(image.max()) + 1 if image.size else where
    after = np.arange(after_start, after_start + len(ids) - where - 1, dtype=np.int64)
    positions = np.concatenate([np.broadcast_to(before, (3, before.size)), image,
                                np.broadcast_to(after, (3, after.size))], axis=1)
    return np.ascontiguousarray(positions), int(after_start + after.size)


def stitch_qwen(ids: list[int], image_token_id: int, table: np.ndarray, image_embeds: np.ndarray,
                kept: np.ndarray, grid: tuple[int, int], mode: str = "original"):
    """``(inputs_embeds [1, S, D], position_ids [3, 1, S], next_position)``: the prompt's token embeddings with the
    image placeholder replaced by the kept tokens (between ``<|vision_start|>`` and ``<|vision_end|>``, which the
    chat template already holds), and their M-RoPE positions."""
    if ids.count(image_token_id) != 1:
        raise VlmpruneError(f"the tokenized prompt holds {ids.count(image_token_id)} image tokens, expected 1",
                            "check the bundle's chat template and image token")
    where = ids.index(image_token_id)
    tokens = np.asarray(image_embeds).reshape(-1, table.shape[1])
    embeds = np.concatenate([np.asarray(table[ids[:where]]), tokens.astype(table.dtype),
                             np.asarray(table[ids[where + 1:]])], axis=0)[None]
    positions, next_pos = prompt_positions(ids, image_token_id, grid, kept, mode)
    return np.ascontiguousarray(embeds), positions[:, None, :], next_pos
