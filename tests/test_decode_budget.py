"""The shared decode loop's budget (issue 27): it counts what runs out first, the cache slots (prompt tokens, not
position ids), a decoder's own buffer (``capacity``: the fused decoder's ``buffer_length``) and the position ids,
and a generation that reaches the end stops with ``context`` and keeps its answer. The fake decoder is strict: like
``OrtDecoder`` and ``FusedDecoder`` it refuses a step past its slots."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.runtime.decode_loop import decode
from vlmprune.runtime.pipeline import Timings


class StrictDecoder:
    def __init__(self, capacity: int, vocab: int = 8):
        self.capacity, self.vocab, self.length = capacity, vocab, 0

    def reset(self):
        self.length = 0

    def step(self, embeds, positions):
        if self.length + embeds.shape[1] > self.capacity:
            raise VlmpruneError(f"the sequence would reach {self.length + embeds.shape[1]} tokens", "")
        self.length += embeds.shape[1]
        logits = np.zeros(self.vocab, np.float32)
        logits[1 + self.length % (self.vocab - 1)] = 1.0  # never token 0 (the EOS here)
        return logits


def _run(decoder, prompt_tokens, next_pos, max_context, max_new_tokens):
    table = np.zeros((8, 4), np.float32)
    embeds = np.zeros((1, prompt_tokens, 4), np.float32)
    return decode(decoder, table, embeds, np.zeros((1, prompt_tokens), np.int64), next_pos, max_context=max_context,
                  max_new_tokens=max_new_tokens, eos=0, decode_text=lambda ids: "x" * len(ids), timings=Timings(),
                  start=0.0)


def test_positions_behind_the_cache_stop_at_the_last_slot():
    """M-RoPE: 40 prompt tokens at positions 0..15; the cache (64 slots) runs out before the positions."""
    out = _run(StrictDecoder(64), 40, 16, 64, 10**9)
    assert out.stop == "context" and len(out.tokens) == 64 - 40 and out.text == "x" * 24


def test_a_fused_buffer_shorter_than_the_context_counts():
    out = _run(StrictDecoder(32), 10, 10, 64, 10**9)
    assert out.stop == "context" and len(out.tokens) == 22


def test_gapped_positions_ahead_of_the_cache_count():
    out = _run(StrictDecoder(64), 10, 60, 64, 10**9)
    assert out.stop == "context" and len(out.tokens) == 4


def test_the_users_limit_comes_first():
    out = _run(StrictDecoder(64), 10, 10, 64, 5)
    assert out.stop == "length" and len(out.tokens) == 5


def test_a_prompt_that_fills_the_cache_is_one_line():
    with pytest.raises(VlmpruneError, match="leaves no room for an answer"):
        _run(StrictDecoder(64), 64, 20, 64, 10)


class PoisonedDecoder(StrictDecoder):
    """What an int4 decoder with NaN or inf scales returns (issue 26)."""

    file = "decoder_int4.onnx"

    def __init__(self, value, at_step):
        super().__init__(64)
        self.value, self.at_step, self.steps = value, at_step, 0

    def step(self, embeds, positions):
        logits = super().step(embeds, positions).copy()
        self.steps += 1
        if self.steps >= self.at_step:
            logits[3] = self.value
        return logits


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("at_step", [1, 3])  # the prefill's logits, a later step's
@pytest.mark.parametrize("temperature", [0.0, 0.8])  # greedy would return token 0 / 3; sampling raised from numpy
def test_non_finite_logits_are_one_line_naming_the_decoder(value, at_step, temperature):
    table = np.zeros((8, 4), np.float32)
    with pytest.raises(VlmpruneError, match=r"decoder decoder_int4.onnx returned non-finite logits"):
        decode(PoisonedDecoder(value, at_step), table, np.zeros((1, 4, 4), np.float32), np.zeros((1, 4), np.int64), 4,
               max_context=64, max_new_tokens=10, eos=0, decode_text=lambda ids: "", timings=Timings(), start=0.0,
               temperature=temperature, seed=1)


def test_a_masked_token_is_not_an_error():
    class Masked(StrictDecoder):
        def step(self, embeds, positions):
            logits = super().step(embeds, positions).copy()
            logits[0] = -np.inf
            return logits

    assert len(_run(Masked(64), 4, 4, 64, 3).tokens) == 3
