"""G-Prune, arXiv 2501.02268, following the authors' public code as ``specs/methods.md`` fixes it.

Cosine graph over the post-projector features, edges below the threshold removed, rows normalised with a
temperature softmax; the L2 norms are propagated ``iterations`` times as ``w <- w P`` (vector-matrix products,
never a matrix power) and divided by the exact degree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PruneModule
from .select import l2_norm, l2_normalize, topk_ascending

# The authors fill excluded entries with -5000 before the softmax; the mask multiply below then makes them
# exactly zero even for a row whose every entry is excluded.
_EXCLUDED_LOGIT = -5000.0


def gprune_scores(features: Tensor, threshold: float = 0.5, temperature: float = 0.03, iterations: int = 5) -> Tensor:
    """G-Prune score ``w_i / D_i`` [B, N] for post-projector features [B, N, D], computed in fp32."""
    x = features.float()
    weight = l2_norm(x)  # [B, N] initial score
    xn = l2_normalize(x)
    cos = torch.matmul(xn, xn.transpose(-1, -2))  # [B, N, N], self included
    mask = (cos >= threshold).float()
    # a scalar fill broadcasts; full_like would be constant-folded into an N x N tensor stored in the graph
    logits = torch.where(mask > 0, cos / temperature, torch.tensor(_EXCLUDED_LOGIT, dtype=cos.dtype))
    p = torch.softmax(logits, dim=-1) * mask
    degree = mask.sum(-1)  # exact count, never read off the softmax
    w = weight
    for _ in range(int(iterations)):
        w = torch.matmul(w.unsqueeze(1), p).squeeze(1)
    return w / degree


def gprune_select(
    features: Tensor, k: int, *, threshold: float = 0.5, temperature: float = 0.03, iterations: int = 5
) -> Tensor:
    """Kept indices [B, K] ascending for post-projector ``features`` [B, N, D]."""
    return topk_ascending(gprune_scores(features, threshold, temperature, iterations), k)


class GPrune(PruneModule):
    name = "gprune"
    stage = "post"

    def __init__(self, k, grid, has_cls=True, threshold: float = 0.5, temperature: float = 0.03, iterations: int = 5):
        super().__init__(k, grid, has_cls)
        if temperature <= 0:
            raise ValueError(f"G-Prune temperature must be > 0, got {temperature}")
        if iterations < 0:
            raise ValueError(f"G-Prune iterations must be >= 0, got {iterations}")
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.iterations = int(iterations)

    def select(self, ctx):
        return topk_ascending(gprune_scores(ctx.projected, self.threshold, self.temperature, self.iterations), self.k)
