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
    before, after = np.asarray(ids[:where]), np.asarray(ids[where + 1 :])
    k = image_embeds.shape[1]
    embeds = np.concatenate(
        [table[before], image_embeds[0].astype(table.dtype, copy=False), table[after]], axis=0
    )[None]
    if positions == "contiguous":
        pos = np.arange(embeds.shape[1], dtype=np.int64)
        next_pos = embeds.shape[1]
    else:
        image_pos = where + kept_indices[0].astype(np.int64)
        text_after = where + num_patches + np.arange(len(after), dtype=np.int64)
        pos = np.concatenate([np.arange(where, dtype=np.int64), image_pos, text_after])
        next_pos = where + num_patches + len(after)
    assert pos.shape[0] == embeds.shape[1] == len(ids) - 1 + k
    return np.ascontiguousarray(embeds), pos[None], int(next_pos)
