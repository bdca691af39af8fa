"""The token loop every pipeline shares: prefill, then sample, stream and step until EOS, the budget or the context.

Families differ only in what they stitch before it and in the shape of one step's position ids ([1, 1] for 1-D
rotary, [3, 1, 1] for M-RoPE, where the text continues with one position on all three axes). Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vlmprune.errors import VlmpruneError

from .sampling import next_token


def token_budget(decoder, prompt_tokens: int, next_pos: int, max_context: int, max_new_tokens: int) -> int:
    """How many tokens may be generated: what runs out first. The KV cache holds one slot per token (prompt and
    answer, whatever their position ids: M-RoPE's image tokens share positions, so positions run behind the token
    count), a decoder's own buffer may be shorter than the context (``capacity``: the fused decoder's
    ``buffer_length``, a TensorRT engine's allocation), and position ids must stay below the context (``original``
    positions leave gaps, so they can run ahead of the token count)."""
    slots = min(max_context, int(getattr(decoder, "capacity", max_context)))
    room = min(slots - prompt_tokens, max_context - next_pos)
    if room < 1:
        raise VlmpruneError(f"the prompt takes {prompt_tokens} cache slots and position ids up to {next_pos - 1}, "
                            f"which leaves no room for an answer in the decoder's context of {slots}",
                            "shorten the prompt or use a bucket with fewer visual tokens (--keep)")
    return min(max_new_tokens, room)


def check_logits(logits: np.ndarray, decoder) -> None:
    """Non-finite logits (a quantized decoder with NaN or inf scales, an overflow) would make greedy decoding return
    token 0 and sampling fail inside numpy: one line naming the decoder instead. ``max`` propagates NaN and +inf,
    so one reduction checks the row (a lone -inf is a legitimately masked token)."""
    top = logits.max()
    if not np.isfinite(top):
        name = getattr(decoder, "file", None) or getattr(decoder, "name", None) or type(decoder).__name__
        raise VlmpruneError(f"the decoder {name} returned non-finite logits ({top})",
                            "its weights or quantization scales hold NaN or inf: re-export or re-quantize it")


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    stop: str  # "eos", "length", "context" or "cancelled"


def decode(decoder, table: np.ndarray, embeds: np.ndarray, positions: np.ndarray, next_pos: int, *, max_context: int,
           max_new_tokens: int, eos: int | None, decode_text: Callable[[list[int]], str], timings, start: float,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, position_rank: int = 2,
           on_text: Callable[[str], None] | None = None, ignore_eos: bool = False, hooks=None,
           prefill_inputs: dict | None = None) -> Decoded:
    """Fill ``timings`` (prefill_ms, ttft_ms from ``start``, tpot_ms, total_ms) and return the generated tokens.

    The generation stops with ``context`` when the sequence reaches the context (``budget``), and keeps its answer.
    ``hooks`` (``reuse.Reuse``, optional): the prefill starts after the longest cached KV prefix of the stitched
    sequence and leaves the prompt's KV for later requests; ``hooks.cancelled()`` stops the loop before a step.
    ``prefill_inputs``: the decoder's prefill-only inputs by kind (DeepStack); the steps after it go without. They
    address the whole prompt, so a prompt with them is prefilled whole (no KV prefix reuse)."""
    budget = token_budget(decoder, embeds.shape[1], next_pos, max_context, max_new_tokens)
    rng = np.random.default_rng(seed)
    decoder.reset()
    t0 = time.perf_counter()
    if prefill_inputs:
        logits = decoder.step(embeds, positions, prefill_inputs)
    else:
        reused = hooks.before_prefill(decoder, embeds, positions) if hooks is not None else 0
        logits = decoder.step(embeds[:, reused:], positions[..., reused:])
    check_logits(logits, decoder)
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
        if hooks is not None and hooks.cancelled():  # a client gone, a stop string seen, a deadline passed
            stop = "cancelled"
            break
        step_position[...] = next_pos  # a preallocated position and a view of the table: nothing allocated per token
        logits = decoder.step(rows[token][None, None], step_position)
        check_logits(logits, decoder)
        next_pos += 1
    if hooks is not None:  # after the answer, so the copy is not in its TTFT; the prompt's rows are still there
        hooks.after_prefill(decoder, embeds.shape[1])
    end = time.perf_counter()
    timings.total_ms = (end - start) * 1e3
    after_first = max(0, len(generated) - 1) if stop != "eos" else len(generated)
    timings.tpot_ms = (end - t_first) * 1e3 / after_first if after_first else 0.0
    text = decode_text(generated)
    if on_text is not None and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return Decoded(generated, text, stop)
