"""``l2norm``: top-K of the post-projector L2 norm (the G-Prune paper's ablation)."""

from __future__ import annotations

from torch import Tensor

from .base import PruneModule
from .select import l2_norm, topk_ascending


def l2norm_select(features: Tensor, k: int) -> Tensor:
    """Kept indices [B, K] ascending: the tokens with the largest L2 norm of ``features`` [B, N, D]."""
    return topk_ascending(l2_norm(features), k)


class L2Norm(PruneModule):
    name = "l2norm"
    stage = "post"

    def select(self, ctx):
        return l2norm_select(ctx.projected, self.k)
