"""Stitching: text embeddings from the exported table, the K kept image tokens in place of the placeholder."""

from __future__ import annotations

import numpy as np

POSITION_MODES = ("contiguous", "original")


def stitch(
    ids: list[int],
    image_token_id: int,
    table: np.ndarray,
    image_embeds: np.ndarray,
    kept_indices: np.ndarray,
    num_patches: int,
    positions: str = "contiguous",
) -> tuple[np.ndarray, np.ndarray, int]:
    """``inputs_embeds [1, L, D]``, ``position_ids [1, L]`` and the next free position.

    ``contiguous`` numbers the shortened sequence 0..L-1, as transformers does for the sequence it is given.
    ``original`` keeps each kept image token at the position it had among all N (gaps where tokens were pruned)
    and the text after the image continues after position start + N, as the G-Prune authors do.
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}")
    where = ids.index(image_token_id)
    # int64 even when empty: a prompt may end with the image (an empty float array is not an index)
    before, after = np.asarray(ids[:where], np.int64), np.asarray(ids[where + 1 :], np.int64)
    k = image_embeds.shape[1]
    embeds = np.concatenate(
        [table[before], image_embeds[0].astype(table.dtype, copy=False), table[after]], axis=0
    )[None]
    pos = positions_for(len(ids), where, kept_indices[0], num_patches, positions)
    next_pos = next_position(len(ids), where, k, num_patches, positions)
    assert pos.shape[0] == embeds.shape[1] == len(ids) - 1 + k
    return np.ascontiguousarray(embeds), pos[None], int(next_pos)


def next_position(length: int, where: int, k: int, num_patches: int, positions: str = "contiguous") -> int:
    """The position after the prompt: prompt tokens (``length`` ids, one image placeholder) with K image tokens in
    ``contiguous`` mode; in ``original`` mode each image token keeps its place among all N, so the text after the
    image starts at ``where + N``. Known before the vision graph runs, so the context check can come first."""
    if positions == "contiguous":
        return length - 1 + k
    return where + num_patches + (length - where - 1)


def positions_for(length: int, where: int, kept: np.ndarray, num_patches: int, positions: str) -> np.ndarray:
    if positions == "contiguous":
        return np.arange(length - 1 + len(kept), dtype=np.int64)
    image_pos = where + np.asarray(kept).astype(np.int64)
    text_after = where + num_patches + np.arange(length - where - 1, dtype=np.int64)
    return np.concatenate([np.arange(where, dtype=np.int64), image_pos, text_after])
