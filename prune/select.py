"""Traceable selection primitives shared by every method.

All of them keep to the op rules of ``specs/tensorrt.md``: comparisons, reductions with constant axes, Where,
and one TopK with a constant K on a float key. There is no Sort and no integer TopK. Ties are broken toward the
lower token index by an explicit pairwise rank rather than trusting TopK's tie order, which TensorRT does not
promise; the rank costs O(N^2) comparisons, which is small next to the encoder at N <= a few thousand.
"""

from __future__ import annotations

import torch
from torch import Tensor

_F32_MAX = float(torch.finfo(torch.float32).max)


def sanitize(scores: Tensor) -> Tensor:
    """Make the order total: NaN and -inf become the lowest finite value, +inf the highest.

    ``x == x`` is false only for NaN; it is used instead of IsNaN, which older TensorRT parsers lack.
    """
    s = scores.float()
    s = torch.where(s == s, s, torch.tensor(-_F32_MAX, dtype=s.dtype))  # scalar: no N-sized constant in the graph
    return torch.clamp(s, -_F32_MAX, _F32_MAX)


def _positions(n: int, like: Tensor) -> Tensor:
    return torch.arange(n, device=like.device, dtype=torch.float32)


def rank_desc(scores: Tensor, same_group: Tensor | None = None) -> Tensor:
    """Rank of each entry along the last axis, 0 for the best: higher score first, then lower index.

    ``same_group`` ([N, N] bool) restricts the ranking to entries of the same group (GridPrune's zones).
    Returns float ranks (exact integers) of shape ``scores.shape``.
    """
    s = sanitize(scores)
    n = s.shape[-1]
    pos = _positions(n, s)
    s_i = s.unsqueeze(-1)  # the entry being ranked
    s_j = s.unsqueeze(-2)  # the entries it is compared with
    lower = pos.unsqueeze(0) < pos.unsqueeze(1)  # [i, j]: j comes before i
    before = (s_j > s_i) | ((s_j == s_i) & lower)
    if same_group is not None:
        before = before & same_group
    return before.float().sum(-1)


def ascending_from_mask(kept: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` True entries of ``kept`` ([B, N]) in ascending order, as int64 [B, k].

    A float key ``kept * (N - position)`` makes TopK return the kept positions smallest first, so no integer
    sort is needed. ``kept`` must hold exactly ``k`` True entries per row.
    """
    n = kept.shape[-1]
    key = kept.float() * (float(n) - _positions(n, kept))
    return torch.topk(key, k, dim=-1, largest=True, sorted=True).indices


def topk_ascending(scores: Tensor, k: int) -> Tensor:
    """The ``k`` best entries of ``scores`` ([B, N]) by value (ties to the lower index), in ascending index order."""
    return ascending_from_mask(rank_desc(scores) < k, k)


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """``tokens`` [B, N, C] at ``indices`` [B, K] -> [B, K, C]."""
    idx = indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, idx)


def unbiased_var(x: Tensor) -> Tensor:
    """Unbiased variance over the last axis, written out so it exports as plain reductions."""
    n = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    return ((x - mean) ** 2).sum(-1) / float(max(n - 1, 1))


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    # Written out (not F.normalize) so it exports as elementwise ops + ReduceSum: no ReduceL2 axes trap.
    norm = (x * x).sum(-1, keepdim=True).sqrt()
    return x / torch.clamp(norm, min=eps)


def l2_norm(x: Tensor) -> Tensor:
    return (x.float() * x.float()).sum(-1).sqrt()
