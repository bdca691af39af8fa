"""The token loop every pipeline shares: prefill, then sample, stream and step until EOS, the budget or the context.

Families differ only in what they stitch before it and in the shape of one step's position ids ([1, 1] for 1-D
rotary, [3, 1, 1] for M-RoPE, where the text continues with one position on all three axes). Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .sampling import next_token


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    stop: str  # "eos", "length" or "context"


def decode(decoder, table: np.ndarray, embeds: np.ndarray, positions: np.ndarray, next_pos: int, *, max_context: int,
           max_new_tokens: int, eos: int | None, decode_text: Callable[[list[int]], str], timings, start: float,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, position_rank: int = 2,
           on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
           prefill_inputs: dict | None = None) -> Decoded:
    """Fill ``timings`` (prefill_ms, ttft_ms from ``start``, tpot_ms, total_ms) and return the generated tokens.
    ``prefill_inputs``: the decoder's prefill-only inputs by kind (DeepStack); the steps after it go without."""
    budget = min(max_new_tokens, max_context - next_pos)
    rng = np.random.default_rng(seed)
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.step(embeds, positions, prefill_inputs) if prefill_inputs else decoder.step(embeds, positions)
    timings.prefill_ms = (time.perf_counter() - t0) * 1e3
    generated: list[int] = []
    emitted = ""
    stop = "length" if budget == max_new_tokens else "context"
    t_first = None
    step_position = np.zeros((3, 1, 1) if position_rank == 3 else (1, 1), np.int64)
    rows = table.view(np.ndarray)  # the same mapped table; indexing a plain array skips np.memmap's overhead
    while True:
        token = next_token(logits, temperature, top_p, rng)
        if t_first is None:
            t_first = time.perf_counter()
            timings.ttft_ms = (t_first - start) * 1e3
        if token == eos and not ignore_eos:
            stop = "eos"
            break
        generated.append(token)
        if on_text is not None:
            text = decode_text(generated)
            if len(text) > len(emitted) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                on_text(text[len(emitted):])
                emitted = text
        if len(generated) >= budget:
            break
        step_position[...] = next_pos  # a preallocated position and a view of the table: nothing allocated per token
        logits = decoder.step(rows[token][None, None], step_position)
        next_pos += 1
    end = time.perf_counter()
    timings.total_ms = (end - start) * 1e3
    after_first = max(0, len(generated) - 1) if stop != "eos" else len(generated)
    timings.tpot_ms = (end - t_first) * 1e3 / after_first if after_first else 0.0
    text = decode_text(generated)
    if on_text is not None and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return Decoded(generated, text, stop)
