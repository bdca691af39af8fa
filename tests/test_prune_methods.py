"""Each method's module form selects the same indices as the loop-based reference in tests/prune_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prune_reference as ref
from preset_geometry import PRESET_GRIDS, grid_id
from vlmprune.prune import (
    METHODS,
    TensorContext,
    cls_attention,
    fopru_select,
    gprune_select,
    gridprune_select,
    l2norm_select,
)

SEEDS = [0, 1, 2]
GRIDS = [*PRESET_GRIDS, (12, 20)]  # every registered preset's token grid and a non-square grid


def make_qk(seed, grid, heads=4, dim=16, has_cls=True):
    g = torch.Generator().manual_seed(seed)
    t = grid[0] * grid[1] + (1 if has_cls else 0)
    q = torch.randn(1, heads, t, dim, generator=g) * 1.5
    k = torch.randn(1, heads, t, dim, generator=g) * 1.5 + torch.randn(1, heads, 1, dim, generator=g)
    return q, k, dim**-0.5


def explicit_attention(q, k, scale, probs=True):
    """Head-averaged attention map [T, T] in float64, one head at a time."""
    qd, kd = q[0].double().numpy(), k[0].double().numpy()
    maps = []
    for h in range(qd.shape[0]):
        logits = qd[h] @ kd[h].T * scale
        if probs:
            logits = np.exp(logits - logits.max(-1, keepdims=True))
            logits = logits / logits.sum(-1, keepdims=True)
        maps.append(logits)
    return np.mean(maps, axis=0)


def as_list(indices):
    assert indices.dtype == torch.int64
    return indices[0].tolist()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
@pytest.mark.parametrize("scores", ["probs", "logits"])
def test_fopru_rank_matches_reference(seed, grid, scores):
    q, k, scale = make_qk(seed, grid)
    n = grid[0] * grid[1]
    budget = n // 4
    module = METHODS["fopru"].build(budget, grid, True, scores=scores)
    got = as_list(module.select(TensorContext(q=q, k=k, scale=scale)))
    want = ref.fopru(explicit_attention(q, k, scale, probs=scores == "probs"), budget)
    assert got == want
    assert len(got) == budget


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_fopru_row_matches_reference(seed, grid):
    q, k, scale = make_qk(seed, grid)
    n = grid[0] * grid[1]
    module = METHODS["fopru"].build(n // 4, grid, True, strategy="row")
    got = as_list(module.select(TensorContext(q=q, k=k, scale=scale)))
    want = ref.fopru(explicit_attention(q, k, scale), n // 4, strategy="row", grid=grid)
    assert got == want
    assert len(got) % grid[1] == 0 and len(got) == module.k


@pytest.mark.parametrize("grid", PRESET_GRIDS, ids=grid_id)
def test_fopru_functional_api_matches_module(grid):
    q, k, scale = make_qk(5, grid)
    attn = torch.from_numpy(explicit_attention(q, k, scale)).float().unsqueeze(0)
    budget = grid[0] // 4 * grid[1]  # a whole number of rows, so the row strategy keeps exactly this many
    module = METHODS["fopru"].build(budget, grid, True)
    assert fopru_select(attn, budget).tolist() == module.select(TensorContext(q=q, k=k, scale=scale)).tolist()
    rows = fopru_select(attn, budget, strategy="row", grid=grid)
    assert rows.shape == (1, budget)


def test_fopru_without_cls():
    grid = (12, 20)
    q, k, scale = make_qk(3, grid, has_cls=False)
    module = METHODS["fopru"].build(60, grid, False)
    got = as_list(module.select(TensorContext(has_cls=False, q=q, k=k, scale=scale)))
    assert got == ref.fopru(explicit_attention(q, k, scale), 60, has_cls=False)


def clustered_features(seed, n, dim=32, clusters=12):
    """Features with cluster structure, so the cosine graph has edges above the 0.5 threshold."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    assign = torch.randint(0, clusters, (n,), generator=g)
    scale = torch.rand(n, 1, generator=g) * 2 + 0.5
    return (centres[assign] + 0.6 * torch.randn(n, dim, generator=g)) * scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_gprune_matches_reference(seed, grid):
    n = grid[0] * grid[1]
    x = clustered_features(seed, n)
    module = METHODS["gprune"].build(n // 4, grid, True)
    got = as_list(module.select(TensorContext(projected_=x.unsqueeze(0))))
    assert got == ref.gprune(x.numpy(), n // 4)
    assert gprune_select(x.unsqueeze(0), n // 4)[0].tolist() == got


def gridprune_inputs(seed, grid, dim=24):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    joint = torch.randn(1, n, dim, generator=g)
    joint[0, : n // 3] += torch.randn(dim, generator=g)  # a region related to the text
    text = torch.randn(1, dim, generator=g)
    q, k, scale = make_qk(seed + 100, grid)
    return joint, text, q, k, scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
@pytest.mark.parametrize("tau", [1.0, 0.02])  # 0.02 concentrates the budget so zones overflow
def test_gridprune_matches_reference(seed, grid, tau):
    joint, text, q, k, scale = gridprune_inputs(seed, grid)
    n = grid[0] * grid[1]
    budget = n // 4
    module = METHODS["gridprune"].build(budget, grid, True, tau=tau)
    ctx = TensorContext(q=q, k=k, scale=scale, joint_=joint, text_embeds_=text)
    got = as_list(module.select(ctx))
    cls = cls_attention(q, k, scale)
    want = ref.gridprune(joint[0].numpy(), text[0].numpy(), cls[0].double().numpy(), budget, grid, tau=tau)
    assert got == want
    functional = gridprune_select(joint, text, cls, budget, grid=grid, tau=tau)
    assert functional[0].tolist() == got


@pytest.mark.parametrize("seed", SEEDS)
def test_l2norm_matches_reference(seed):
    x = clustered_features(seed, 240)
    module = METHODS["l2norm"].build(60, (12, 20), True)
    got = as_list(module.select(TensorContext(projected_=x.unsqueeze(0))))
    assert got == ref.l2norm(x.numpy(), 60) == l2norm_select(x.unsqueeze(0), 60)[0].tolist()


def test_pool_averages_two_by_two_windows():
    grid = (4, 6)
    x = torch.arange(24 * 3, dtype=torch.float32).reshape(1, 24, 3)
    module = METHODS["pool"].build(6, grid, True)
    indices, tokens = module(TensorContext(patches_=x))
    assert indices[0].tolist() == [0, 2, 4, 12, 14, 16]
    assert tokens.shape == (1, 6, 3)
    # window at rows 0-1, cols 2-3: tokens 2, 3, 8, 9
    assert torch.allclose(tokens[0, 1], x[0, [2, 3, 8, 9]].mean(0))


def test_none_keeps_everything_in_order():
    x = torch.randn(1, 240, 8)
    module = METHODS["none"].build(240, (12, 20), True)
    indices, tokens = module(TensorContext(patches_=x))
    assert indices[0].tolist() == list(range(240))
    assert torch.equal(tokens, x)


@pytest.mark.parametrize("grid", PRESET_GRIDS, ids=grid_id)
def test_module_gathers_tokens_at_the_kept_indices(grid):
    q, k, scale = make_qk(0, grid)
    n = grid[0] * grid[1]
    x = torch.randn(1, n, 8)
    indices, tokens = METHODS["fopru"].build(n // 4, grid, True)(TensorContext(q=q, k=k, scale=scale, patches_=x))
    assert torch.equal(tokens, x[:, indices[0]])
