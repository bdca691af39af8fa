"""Plain, readable reference implementations of the pruning methods, written from ``specs/methods.md`` with loops
and float64 arithmetic, independently of the traceable modules they check.

The one shared step is G-Prune's cosine matrix, taken in float32 like the module: its threshold test (C >= 0.5)
would otherwise flip on the ~1e-7 rounding of the odd pair that sits on the threshold.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def order_key(value: float, index: int):
    """Sort key: higher score first, ties to the lower index; NaN and -inf last, +inf first."""
    if math.isnan(value):
        value = -math.inf
    return (-value, index)


def top_k_indices(scores, k):
    ranked = sorted(range(len(scores)), key=lambda i: order_key(float(scores[i]), i))
    return sorted(ranked[:k])


def unbiased_variance(values):
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1)


def fopru(attn, k, strategy="rank", grid=None, has_cls=True):
    """``attn``: [T, T] head-averaged map of one image."""
    a = np.asarray(attn, dtype=np.float64)
    if has_cls:
        a = a[1:, 1:]
    n = a.shape[0]
    s1 = [sum(a[i, j] for j in range(n)) / n for i in range(n)]  # attention each query gives
    s2 = [sum(a[i, j] for i in range(n)) / n for j in range(n)]  # attention each key receives
    sig = s1 if unbiased_variance(s1) > unbiased_variance(s2) else s2
    if strategy == "rank":
        return top_k_indices(sig, k)
    h, w = grid
    rows = min(h, max(1, int(k / w + 0.5)))
    row_sums = [sum(sig[r * w + c] for c in range(w)) for r in range(h)]
    best_rows = top_k_indices(row_sums, rows)
    return [r * w + c for r in best_rows for c in range(w)]


def gprune(features, k, threshold=0.5, temperature=0.03, iterations=5):
    """``features``: [N, D] post-projector features of one image."""
    x32 = torch.as_tensor(features, dtype=torch.float32)
    norms32 = x32.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (x32 / norms32) @ (x32 / norms32).T  # float32, see the module docstring
    cos = cos.double().numpy()
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    weight = [math.sqrt(sum(v * v for v in x[i])) for i in range(n)]
    p = np.zeros((n, n))
    degree = [0] * n
    for i in range(n):
        linked = [j for j in range(n) if cos[i, j] >= threshold]
        degree[i] = len(linked)
        if not linked:
            continue
        top = max(cos[i, j] / temperature for j in linked)
        exps = {j: math.exp(cos[i, j] / temperature - top) for j in linked}
        total = sum(exps.values())
        for j in linked:
            p[i, j] = exps[j] / total
    w = list(weight)
    for _ in range(iterations):
        w = [sum(w[i] * p[i, j] for i in range(n)) for j in range(n)]
    scores = [w[i] / degree[i] if degree[i] else math.nan for i in range(n)]
    return top_k_indices(scores, k)


def zones_of(grid, g):
    h, w = grid
    return [(r * g // h) * g + (c * g // w) for r in range(h) for c in range(w)]


def largest_remainder(quotas, k, eligible):
    """Floor every quota, then one more to the largest remainders (ties to the lower zone) until the sum is k."""
    floors = {z: math.floor(quotas[z]) for z in eligible}
    left = k - sum(floors.values())
    by_remainder = sorted(eligible, key=lambda z: (-(quotas[z] - floors[z]), z))
    for z in by_remainder[:left]:
        floors[z] += 1
    return floors


def zone_budgets(probs, sizes, k, max_rounds):
    z_count = len(probs)
    probs = [p + 1e-30 for p in probs]  # the spec's floor for underflowed zone probabilities
    budgets = [0] * z_count
    remaining = k
    eligible = list(range(z_count))
    rounds = 0
    while remaining > 0:
        rounds += 1
        assert rounds <= max_rounds, "budget capping did not settle"
        total = sum(probs[z] for z in eligible)
        quotas = {z: probs[z] / total * remaining for z in eligible}
        for z, extra in largest_remainder(quotas, remaining, eligible).items():
            budgets[z] += extra
        remaining = 0
        for z in range(z_count):
            if budgets[z] > sizes[z]:
                remaining += budgets[z] - sizes[z]
                budgets[z] = sizes[z]
        eligible = [z for z in range(z_count) if budgets[z] < sizes[z]]
    return budgets


def gridprune_parts(patch_embeds, text_embed, cls_attn, k, grid, zones=4, alpha=0.5, tau=1.0):
    v = np.asarray(patch_embeds, dtype=np.float64)
    t = np.asarray(text_embed, dtype=np.float64)
    a = np.asarray(cls_attn, dtype=np.float64)
    n = v.shape[0]
    t = t / math.sqrt(sum(x * x for x in t))
    rel = [float(v[i] @ t) / math.sqrt(float(v[i] @ v[i])) for i in range(n)]
    a_max = max(a)
    score = [(1 - alpha) * (rel[i] + 1) / 2 + alpha * a[i] / a_max for i in range(n)]
    zone = zones_of(grid, zones)
    z_count = zones * zones
    members = [[i for i in range(n) if zone[i] == z] for z in range(z_count)]
    zone_mean = [sum(rel[i] for i in m) / len(m) for m in members]
    top = max(zone_mean)
    exps = [math.exp((zm - top) / tau) for zm in zone_mean]
    probs = [e / sum(exps) for e in exps]
    budgets = zone_budgets(probs, [len(m) for m in members], k, max_rounds=z_count)
    kept = []
    for z, m in enumerate(members):
        ranked = sorted(m, key=lambda i: order_key(score[i], i))
        kept.extend(ranked[: budgets[z]])
    return sorted(kept), budgets, score, zone


def gridprune(patch_embeds, text_embed, cls_attn, k, grid, zones=4, alpha=0.5, tau=1.0):
    return gridprune_parts(patch_embeds, text_embed, cls_attn, k, grid, zones, alpha, tau)[0]


def l2norm(features, k):
    x = np.asarray(features, dtype=np.float64)
    return top_k_indices([math.sqrt(float(r @ r)) for r in x], k)
