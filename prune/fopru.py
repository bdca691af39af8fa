"""FoPru (Focal Pruning), arXiv 2411.14164, with the choices of ``specs/methods.md``.

Significance from the penultimate encoder layer's head-averaged attention with the CLS row and column dropped:
``s1`` = mean over keys, ``s2`` = mean over queries, keep the one with the strictly larger unbiased variance.
``rank`` keeps the top-K tokens; ``row`` keeps the best whole rows of the grid. Pruning happens before the projector.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PruneModule
from .context import ScoreContext
from .select import ascending_from_mask, rank_desc, topk_ascending, unbiased_var

STRATEGIES = ("rank", "row")
SCORES = ("probs", "logits")


def significance(s1: Tensor, s2: Tensor) -> Tensor:
    """``s1`` where its unbiased variance is strictly larger than that of ``s2``, else ``s2`` (per batch row).

    ``Where`` rather than Python control flow, so the choice stays data-dependent in the exported graph.
    """
    return torch.where((unbiased_var(s1) > unbiased_var(s2)).unsqueeze(-1), s1, s2)


def scores_from_attention(attn: Tensor, has_cls: bool = True) -> Tensor:
    """FoPru significance [B, N] from a head-averaged attention map [B, T, T] (probabilities or logits)."""
    a = attn.float()
    if has_cls:
        a = a[:, 1:, 1:]
    return significance(a.mean(-1), a.mean(-2))


def scores_from_qk(q: Tensor, k: Tensor, scale: float, has_cls: bool = True, scores: str = "probs") -> Tensor:
    """FoPru significance from the scoring layer's queries and keys [B, H, T, d].

    ``probs`` forms the softmax map (the method needs it). ``logits`` uses the closed form: the mean of
    ``q_i . k_j`` over keys is ``q_i . mean(k)``, and over queries ``mean(q) . k_j``, so no N x N matrix.
    """
    if scores == "probs":
        return _scores_from_probs(q, k, scale, has_cls)
    q = q.float()
    k = k.float()
    if has_cls:
        q = q[:, :, 1:]
        k = k[:, :, 1:]
    k_mean = k.mean(2, keepdim=True)  # [B, H, 1, d]
    q_mean = q.mean(2, keepdim=True)
    s1 = torch.matmul(q, k_mean.transpose(-1, -2)).squeeze(-1).mean(1) * scale  # [B, N]
    s2 = torch.matmul(q_mean, k.transpose(-1, -2)).squeeze(-2).mean(1) * scale  # [B, N]
    return significance(s1, s2)


def _scores_from_probs(q: Tensor, k: Tensor, scale: float, has_cls: bool) -> Tensor:
    """The ``probs`` significance without materialising the head-averaged map or slicing it.

    Both means are linear, so they are taken per head and then averaged over heads, as products with constant
    vectors: 1/N on the patches and 0 on CLS (dropping the CLS row and column without renormalising). The
    strided head reduction and slice copies of the [H, T, T] map this replaces cost as much as QK^T on CPU.
    The probabilities are formed with the same op sequence as the encoder's own eager attention
    (``matmul(q, k^T) * scale``, fp32 softmax) so that a graph optimiser's common-subexpression pass can share
    them with the scoring layer instead of computing them twice.
    """
    t = q.shape[2]
    n = t - 1 if has_cls else t
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scale, dim=-1, dtype=torch.float32)  # [B, H, T, T]
    weights = torch.full((t,), 1.0 / n, dtype=torch.float32, device=probs.device)
    if has_cls:
        weights[0] = 0.0
    offset = 1 if has_cls else 0
    s1 = torch.matmul(probs, weights.unsqueeze(-1)).squeeze(-1)[..., offset:].mean(1)  # [B, N] mean over patch keys
    s2 = torch.matmul(weights.unsqueeze(0), probs).squeeze(-2)[..., offset:].mean(1)  # [B, N] mean over patch queries
    return significance(s1, s2)


def rows_for(k: int, grid: tuple[int, int]) -> int:
    """Rows kept by the row strategy for a token budget ``k``: the nearest whole number of rows, at least one."""
    h, w = grid
    return int(min(h, max(1, int(k / w + 0.5))))


def select_rows(sig: Tensor, grid: tuple[int, int], n_rows: int) -> Tensor:
    """Keep the ``n_rows`` grid rows with the largest significance sums (ties to the upper row)."""
    h, w = grid
    b = sig.shape[0]
    row_sums = sig.reshape(b, h, w).sum(-1)
    row_kept = rank_desc(row_sums) < n_rows  # [B, h]
    kept = row_kept.unsqueeze(-1).expand(b, h, w).reshape(b, h * w)
    return ascending_from_mask(kept, n_rows * w)


def fopru_select(
    attn: Tensor,
    k: int,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    has_cls: bool = True,
    scores: str = "probs",
) -> Tensor:
    """Kept indices [B, K] ascending from the head-averaged attention map ``attn`` [B, N(+1), N(+1)].

    ``scores`` names what ``attn`` holds (``probs`` or pre-softmax ``logits``); the computation is the same.
    With ``strategy="row"`` the result has ``rows_for(k, grid) * w`` entries.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown FoPru strategy {strategy!r}; choose one of {STRATEGIES}")
    if scores not in SCORES:
        raise ValueError(f"unknown FoPru scores {scores!r}; choose one of {SCORES}")
    sig = scores_from_attention(attn, has_cls)
    if strategy == "rank":
        return topk_ascending(sig, k)
    if grid is None:
        raise ValueError("FoPru strategy 'row' needs grid=(h, w)")
    return select_rows(sig, grid, rows_for(k, grid))


class FoPru(PruneModule):
    name = "fopru"
    stage = "pre"

    def __init__(self, k, grid, has_cls=True, strategy: str = "rank", scores: str = "probs"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown FoPru strategy {strategy!r}; choose one of {STRATEGIES}")
        if scores not in SCORES:
            raise ValueError(f"unknown FoPru scores {scores!r}; choose one of {SCORES}")
        if strategy == "row":
            k = rows_for(k, grid) * int(grid[1])
        super().__init__(k, grid, has_cls)
        self.strategy = strategy
        self.scores = scores

    def significance(self, ctx: ScoreContext) -> Tensor:
        q, k, scale = ctx.qk()
        return scores_from_qk(q, k, scale, ctx.has_cls, self.scores)

    def select(self, ctx):
        sig = self.significance(ctx)
        if self.strategy == "rank":
            return topk_ascending(sig, self.k)
        return select_rows(sig, self.grid, self.k // self.grid[1])
