"""Stitching for LLaVA-NeXT bundles: the kept tokens in transformers' order (base view, then the unpadded raster row
by row, each row followed by ``image_newline``) in place of the one image placeholder, with position ids.

Positions: ``contiguous`` numbers the stitched sequence 0..L-1. ``original`` gives every kept token (and every
newline) the position it has in the unpruned sequence transformers builds, and the text after the image continues
after the unpruned image's last position (the G-Prune authors' choice).
"""

from __future__ import annotations

import numpy as np

from vlmprune.models.llava_next.geometry import Layout, unpadded_span

POSITION_MODES = ("contiguous", "original")


def image_tokens(layout: Layout, size_hw: tuple[int, int], base_idx: np.ndarray, raster_idx: np.ndarray,
                 count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image part's order: ``(source, row_index, original_offset)`` per token, where ``source`` is 0 for a base
    token, 1 for a raster token, 2 for a newline; ``row_index`` the index into that source's kept list; and
    ``original_offset`` the token's offset in the unpruned image sequence."""
    top, bottom, left, right = unpadded_span(size_hw, layout.raster)
    width = layout.raster[1]
    uw = right - left
    nb = layout.side * layout.side
    kept = np.asarray(raster_idx[:count], np.int64)
    rows, cols = kept // width, kept % width
    if kept.size and (rows.min() < top or rows.max() >= bottom or cols.min() < left or cols.max() >= right):
        raise ValueError("the vision graph kept a raster position outside the unpadded image")
    if kept.size and np.any(np.diff(kept) <= 0):
        raise ValueError("the vision graph's raster indices are not ascending")
    src = [np.zeros(len(base_idx), np.int64)]
    idx = [np.arange(len(base_idx), dtype=np.int64)]
    off = [np.asarray(base_idx, np.int64)]
    starts = np.searchsorted(rows, np.arange(top, bottom + 1))  # kept tokens of each unpadded row
    for i, r in enumerate(range(top, bottom)):
        a, b = starts[i], starts[i + 1]
        row_off = nb + (r - top) * (uw + 1)
        src += [np.ones(b - a, np.int64), np.array([2])]
        idx += [np.arange(a, b, dtype=np.int64), np.array([i])]
        off += [row_off + cols[a:b] - left, np.array([row_off + uw])]
    return np.concatenate(src), np.concatenate(idx), np.concatenate(off)


def stitch_anyres(ids: list[int], image_token_id: int, table: np.ndarray, newline: np.ndarray, out: dict,
                  layout: Layout, size_hw: tuple[int, int], positions: str = "contiguous"
                  ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """``inputs_embeds [1, L, D]``, ``position_ids [1, L]``, the next free position, and the image part's original
    offsets (for pictures). ``out``: the vision graph's outputs."""
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}")
    count = int(out["raster_count"].reshape(-1)[0])
    base_idx = out["base_indices"][0]
    src, idx, off = image_tokens(layout, size_hw, base_idx, out["raster_indices"][0], count)
    d = table.shape[1]
    image = np.empty((len(src), d), table.dtype)
    image[src == 0] = out["base_embeds"][0][idx[src == 0]]
    image[src == 1] = out["raster_embeds"][0][idx[src == 1]]
    image[src == 2] = newline.astype(table.dtype, copy=False)
    where = ids.index(image_token_id)
    before, after = np.asarray(ids[:where], np.int64), np.asarray(ids[where + 1:], np.int64)
    embeds = np.concatenate([table[before], image, table[after]], axis=0)[None]
    total = layout.num_tokens(size_hw, layout.side * layout.side)
    if positions == "contiguous":
        pos = np.arange(embeds.shape[1], dtype=np.int64)
        nxt = embeds.shape[1]
    else:
        pos = np.concatenate([np.arange(where, dtype=np.int64), where + off,
                              where + total + np.arange(len(after), dtype=np.int64)])
        nxt = where + total + len(after)
    return np.ascontiguousarray(embeds), pos[None], int(nxt), off
