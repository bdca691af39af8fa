"""Next-token choice: greedy, or temperature + top-p sampling with a seeded generator."""

from __future__ import annotations

import numpy as np


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
