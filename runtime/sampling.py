"""Next-token choice: greedy, or temperature + top-p sampling with a seeded generator."""

from __future__ import annotations

import math

import numpy as np

from vlmprune.errors import VlmpruneError


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    """The generation settings, checked before any work (``prune-run`` calls it right after parsing)."""
    if max_new_tokens < 1:
        raise VlmpruneError(f"--max-new-tokens {max_new_tokens} must be at least 1", "give a positive number")
    if not 0 < top_p <= 1:
        raise VlmpruneError(f"top-p {top_p} is outside (0, 1]", "give e.g. --top-p 0.9")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise VlmpruneError(f"temperature {temperature} is not a finite number >= 0", "use 0 for greedy or a positive value")
    if seed is not None and not 0 <= seed < 2**63:
        raise VlmpruneError(f"--seed {seed} is negative or too large", "give a seed in 0..2**63-1")


def next_token(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))  # first maximum on ties, like torch.argmax
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # smallest set reaching top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(probs.shape[0], p=probs))
