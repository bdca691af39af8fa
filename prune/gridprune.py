"""GridPrune ("where to look, then what to select"), with the choices of ``specs/methods.md``.

Relevance of each patch to the prompt in the CLIP joint space picks per-zone budgets (softmax over the zones'
mean relevance, largest-remainder rounding, capped at the zone size); inside each zone the tokens with the best
fused score ``(1 - alpha) * (r + 1) / 2 + alpha * a`` are kept, ``a`` being the CLS attention normalised by its max.
Everything is static-shape: zone layout is a constant, the capping runs a fixed number of rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PruneModule
from .context import cls_attention
from .select import ascending_from_mask, l2_normalize, rank_desc


_PROB_FLOOR = 1e-30


def zone_ids(grid: tuple[int, int], zones: int) -> list[int]:
    """Zone of each raster position: row r goes to zone row ``floor(r * g / h)`` (likewise columns), so the zones of
    a grid that ``g`` does not divide differ by at most one row or column."""
    h, w = grid
    if zones < 1 or zones > min(h, w):
        raise ValueError(f"GridPrune zones={zones} must be between 1 and min(h, w)={min(h, w)} for grid {h}x{w}")
    return [(r * zones // h) * zones + (c * zones // w) for r in range(h) for c in range(w)]


def zone_budgets(probs: Tensor, sizes: Tensor, k: int, rounds: int) -> Tensor:
    """Integer budgets [B, Z] (as floats) summing to ``k``, none above its zone's size.

    Largest-remainder rounding of ``probs * k`` (ties to the lower zone index); whatever a zone cannot hold is
    handed to the zones still open, in proportion to ``probs``, for a fixed number of ``rounds``. Each round that
    leaves an excess closes at least one more zone, so ``rounds = Z`` always suffices when ``k <= sum(sizes)``.
    """
    b, z = probs.shape
    # A floor far below fp32 resolution for any real probability: zones whose softmax underflowed to 0 can still
    # take an overflow (sharing it equally) instead of stalling the redistribution.
    probs = probs + _PROB_FLOOR
    budgets = torch.zeros_like(probs)
    remaining = torch.full((b,), float(k), dtype=probs.dtype)
    open_ = torch.ones_like(probs)
    for _ in range(rounds):
        p_open = probs * open_
        share = p_open / torch.clamp(p_open.sum(-1, keepdim=True), min=1e-30) * remaining.unsqueeze(-1)
        base = torch.floor(share)
        extra_count = remaining - base.sum(-1)  # tokens left for the largest remainders
        remainder = torch.where(open_ > 0, share - base, torch.full_like(share, -1.0))
        extra = ((rank_desc(remainder) < extra_count.unsqueeze(-1)) & (open_ > 0)).float()
        budgets = budgets + base + extra
        over = torch.relu(budgets - sizes)
        budgets = budgets - over
        remaining = over.sum(-1)
        open_ = (budgets < sizes).float()
    return budgets


def _zone_tensors(grid, zones, device=None):
    ids = torch.tensor(zone_ids(grid, zones), device=device)
    z = zones * zones
    member = (torch.arange(z, device=device).unsqueeze(1) == ids.unsqueeze(0)).float()  # [Z, N]
    return ids, member, member.sum(-1)


def gridprune_scores(patch_embeds: Tensor, text_embeds: Tensor, cls_attn: Tensor, alpha: float = 0.5):
    """(relevance r [B, N], fused score s [B, N])."""
    v = l2_normalize(patch_embeds.float())
    t = l2_normalize(text_embeds.float())
    r = torch.matmul(v, t.unsqueeze(-1)).squeeze(-1)
    # A cosine lies in [-1, 1]; a non-finite one (NaN input) counts as the least relevant, so the zone budgets,
    # which a single NaN would poison through the softmax, stay finite and still sum to K.
    r = torch.clamp(torch.where(r == r, r, torch.full_like(r, -1.0)), -1.0, 1.0)
    a = cls_attn.float()
    a = a / torch.clamp(a.max(-1, keepdim=True).values, min=1e-30)
    s = (1.0 - alpha) * (r + 1.0) * 0.5 + alpha * a
    return r, s


def gridprune_from_scores(r: Tensor, s: Tensor, k: int, grid, zones: int = 4, tau: float = 1.0) -> Tensor:
    ids, member, sizes = _zone_tensors(grid, zones, r.device)
    n = ids.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"K={k} is outside 1..N={n}")
    zone_mean = torch.matmul(r, member.t()) / sizes  # [B, Z]
    probs = torch.softmax(zone_mean / tau, dim=-1)
    budgets = zone_budgets(probs, sizes, k, rounds=zones * zones)
    token_budget = torch.matmul(budgets, member)  # [B, N]: the budget of each token's zone
    same_zone = ids.unsqueeze(0) == ids.unsqueeze(1)
    kept = rank_desc(s, same_zone) < token_budget
    return ascending_from_mask(kept, k)


def gridprune_select(
    patch_embeds: Tensor,
    text_embeds: Tensor,
    cls_attn: Tensor,
    k: int,
    *,
    grid: tuple[int, int],
    zones: int = 4,
    alpha: float = 0.5,
    tau: float = 1.0,
) -> Tensor:
    """Kept indices [B, K] ascending. ``patch_embeds`` [B, N, E] in the CLIP joint space, ``text_embeds`` [B, E],
    ``cls_attn`` [B, N] the head-averaged attention of CLS to each patch."""
    r, s = gridprune_scores(patch_embeds, text_embeds, cls_attn, alpha)
    return gridprune_from_scores(r, s, k, grid, zones, tau)


class GridPrune(PruneModule):
    name = "gridprune"
    stage = "pre"

    def __init__(self, k, grid, has_cls=True, zones: int = 4, alpha: float = 0.5, tau: float = 1.0):
        super().__init__(k, grid, has_cls)
        if not has_cls:
            raise ValueError("GridPrune's saliency needs a CLS token; this encoder has none")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"GridPrune alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"GridPrune tau must be > 0, got {tau}")
        zone_ids(self.grid, zones)  # validates the layout now rather than at trace time
        self.zones = int(zones)
        self.alpha = float(alpha)
        self.tau = float(tau)

    def select(self, ctx):
        q, k, scale = ctx.qk()
        r, s = gridprune_scores(ctx.joint, ctx.text_embeds, cls_attention(q, k, scale), self.alpha)
        return gridprune_from_scores(r, s, self.k, self.grid, self.zones, self.tau)
