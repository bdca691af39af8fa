"""Ties, non-finite inputs, GridPrune's budget properties, and the registry's budget rules."""

from __future__ import annotations

import math

import pytest
import torch

import prune_reference as ref
from preset_geometry import PRESET_GRIDS, grid_id, spec_k
from vlmprune.errors import VlmpruneError
from vlmprune.prune import METHODS, TensorContext, budget_from_ratio, get_method
from vlmprune.prune.gridprune import gridprune_from_scores, gridprune_scores, zone_budgets, zone_ids
from vlmprune.prune.select import rank_desc, topk_ascending


def test_topk_breaks_ties_toward_lower_index():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 200), generator=g).float()  # many exact ties
    for row in range(3):
        got = topk_ascending(scores[row : row + 1], 37)[0].tolist()
        assert got == ref.top_k_indices(scores[row].tolist(), 37)


def test_rank_is_a_permutation_even_with_ties_and_nonfinite():
    s = torch.tensor([[1.0, float("nan"), 1.0, float("inf"), -float("inf"), float("nan"), 0.0]])
    assert sorted(rank_desc(s)[0].tolist()) == list(range(7))
    # +inf first; NaN and -inf last, by index
    assert topk_ascending(s, 3)[0].tolist() == [0, 2, 3]


def test_fopru_ties_in_quantised_attention():
    grid = (8, 8)
    g = torch.Generator().manual_seed(1)
    attn = torch.randint(0, 4, (1, 65, 65), generator=g).float() / 64  # exactly representable, many ties
    got = METHODS["fopru"].build(16, grid)  # functional form below shares the scores
    from vlmprune.prune import fopru_select

    assert fopru_select(attn, 16)[0].tolist() == ref.fopru(attn[0].numpy(), 16)
    assert fopru_select(attn, 16, strategy="row", grid=grid)[0].tolist() == ref.fopru(
        attn[0].numpy(), 16, strategy="row", grid=grid
    )
    assert got.k == 16


def test_gridprune_equal_zone_relevance_gives_extras_to_lower_zones():
    grid = (8, 8)
    r = torch.zeros(1, 64)  # every zone equally relevant: quota 100/16 = 6.25 is impossible; use 4x4 zones of 4
    s = torch.zeros(1, 64)  # all scores tie: the lowest indices of each zone win
    kept = gridprune_from_scores(r, s, 22, grid, zones=4)[0].tolist()  # 22/16: one each, 6 extras to zones 0..5
    zone = zone_ids(grid, 4)
    per_zone = [sum(1 for i in kept if zone[i] == z) for z in range(16)]
    assert per_zone == [2] * 6 + [1] * 10
    members = [[i for i in range(64) if zone[i] == z] for z in range(16)]
    assert kept == sorted(m[j] for z, m in enumerate(members) for j in range(per_zone[z]))


def inject(x, seed):
    g = torch.Generator().manual_seed(seed)
    y = x.clone().reshape(-1)
    idx = torch.randperm(y.numel(), generator=g)[:20]
    y[idx[:8]] = float("nan")
    y[idx[8:14]] = float("inf")
    y[idx[14:]] = -float("inf")
    return y.reshape(x.shape)


def nonfinite_context(seed, n):
    g = torch.Generator().manual_seed(seed)
    return TensorContext(
        q=inject(torch.randn(1, 4, n + 1, 16, generator=g), seed),
        k=inject(torch.randn(1, 4, n + 1, 16, generator=g), seed + 1),
        patches_=inject(torch.randn(1, n, 32, generator=g), seed + 2),
        projected_=inject(torch.randn(1, n, 32, generator=g), seed + 3),
        joint_=inject(torch.randn(1, n, 24, generator=g), seed + 4),
        text_embeds_=torch.randn(1, 24, generator=g),
    )


@pytest.mark.parametrize("grid", PRESET_GRIDS, ids=grid_id)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_nonfinite_inputs_still_give_k_distinct_valid_indices(name, grid):
    spec = METHODS[name]
    n = grid[0] * grid[1]
    module = spec.build(spec.resolve_k(n, grid, keep=0.25), grid, True)
    first = module.select(nonfinite_context(7, n))
    again = module.select(nonfinite_context(7, n))
    got = first[0].tolist()
    assert len(got) == module.k == len(set(got))
    assert all(0 <= i < n for i in got)
    assert got == sorted(got)
    assert torch.equal(first, again)


def test_all_nan_attention_keeps_the_first_tokens():
    ctx = TensorContext(q=torch.full((1, 2, 65, 4), float("nan")), k=torch.zeros(1, 2, 65, 4))
    assert METHODS["fopru"].build(5, (8, 8)).select(ctx)[0].tolist() == [0, 1, 2, 3, 4]


GRID_CASES = [*((grid, 4) for grid in PRESET_GRIDS), ((10, 14), 4), ((7, 9), 3), ((12, 20), 4), ((5, 5), 5)]


@pytest.mark.parametrize("grid,zones", GRID_CASES)
@pytest.mark.parametrize("seed", range(4))
def test_gridprune_budget_properties(grid, zones, seed):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    zone = zone_ids(grid, zones)
    sizes = [zone.count(z) for z in range(zones * zones)]
    assert max(sizes) - min(sizes) <= max(grid[0], grid[1])  # rows and columns differ by at most one
    for k in sorted({1, n // 9, n // 4, n // 2, n - 3, n}):
        r = torch.randn(1, n, generator=g) * 2
        s = torch.rand(1, n, generator=g)
        tau = [1.0, 0.1, 0.01][seed % 3]
        probs = torch.softmax((torch.stack([r[0, [i for i in range(n) if zone[i] == z]].mean() for z in range(len(sizes))]) / tau), 0)
        budgets = zone_budgets(probs.unsqueeze(0), torch.tensor(sizes, dtype=torch.float32), k, rounds=len(sizes))[0]
        assert budgets.sum().item() == k
        assert all(b <= sz for b, sz in zip(budgets.tolist(), sizes))
        assert all(float(b).is_integer() and b >= 0 for b in budgets.tolist())
        kept = gridprune_from_scores(r, s, k, grid, zones=zones, tau=tau)[0].tolist()
        assert kept == sorted(kept) and len(set(kept)) == k
        for z in range(len(sizes)):
            members = [i for i in range(n) if zone[i] == z]
            chosen = [i for i in kept if zone[i] == z]
            assert len(chosen) == budgets[z]
            best = sorted(members, key=lambda i: ref.order_key(float(s[0, i]), i))[: len(chosen)]
            assert sorted(best) == chosen  # top-k within the zone


def test_zone_sizes_differ_by_at_most_one_row_or_column():
    for h in range(4, 30):
        rows = [sum(1 for r in range(h) if r * 4 // h == zr) for zr in range(4)]
        assert max(rows) - min(rows) <= 1


def test_gridprune_relevance_shapes():
    r, s = gridprune_scores(torch.randn(2, 16, 8), torch.randn(2, 8), torch.rand(2, 16))
    assert r.shape == s.shape == (2, 16)
    assert torch.all(r.abs() <= 1 + 1e-6)


# --- registry and budgets -----------------------------------------------------------------------------------------


def test_registry_lists_every_method_of_the_spec():
    assert set(METHODS) == {"none", "fopru", "gprune", "gridprune", "l2norm", "pool"}
    assert METHODS["fopru"].defaults() == {"strategy": "rank", "scores": "probs"}
    assert METHODS["gprune"].defaults() == {"threshold": 0.5, "temperature": 0.03, "iterations": 5}
    assert METHODS["gridprune"].defaults() == {"zones": 4, "alpha": 0.5, "tau": 1.0}


@pytest.mark.parametrize("grid", PRESET_GRIDS, ids=grid_id)
@pytest.mark.parametrize(
    "name,keep,tokens,options,expected",  # expected(N, h, w), the rules of specs/methods.md
    [
        ("fopru", 0.25, None, {}, lambda n, h, w: spec_k(0.25, n)),
        ("fopru", 0.111, None, {}, lambda n, h, w: spec_k(0.111, n)),
        ("fopru", None, 100, {}, lambda n, h, w: 100),
        ("fopru", 0.25, None, {"strategy": "row"}, lambda n, h, w: spec_k(0.25, h) * w),  # whole rows
        ("fopru", 0.111, None, {"strategy": "row"}, lambda n, h, w: spec_k(0.111, h) * w),
        ("gridprune", 0.5, None, {}, lambda n, h, w: spec_k(0.5, n)),
        ("pool", 0.5, None, {}, lambda n, h, w: n // 4),  # 2x2 windows, whatever the ratio
        ("none", 0.25, None, {}, lambda n, h, w: n),
        ("gprune", 0.001, None, {}, lambda n, h, w: 1),  # never fewer than one token
    ],
)
def test_resolve_k(name, keep, tokens, options, expected, grid):
    n = grid[0] * grid[1]
    assert METHODS[name].resolve_k(n, grid, keep=keep, tokens=tokens, options=options) == expected(n, *grid)


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, math.nan])
def test_keep_outside_unit_interval_is_an_error(keep):
    grid = PRESET_GRIDS[0]
    with pytest.raises(VlmpruneError, match=r"outside \(0, 1\]"):
        METHODS["fopru"].resolve_k(grid[0] * grid[1], grid, keep=keep)


@pytest.mark.parametrize("grid", PRESET_GRIDS, ids=grid_id)
def test_k_larger_than_n_is_an_error(grid):
    n = grid[0] * grid[1]
    with pytest.raises(VlmpruneError, match=f"K={n + 24} tokens is outside 1..N={n} for this model"):
        METHODS["gprune"].resolve_k(n, grid, tokens=n + 24)


def test_unknown_method_and_option_are_errors():
    with pytest.raises(VlmpruneError, match="unknown pruning method 'fastv'.*fopru"):
        get_method("fastv")
    with pytest.raises(VlmpruneError, match="has no option 'alpha'"):
        METHODS["fopru"].parse_options({"alpha": "0.3"})
    with pytest.raises(VlmpruneError, match="not one of rank, row"):
        METHODS["fopru"].parse_options({"strategy": "diagonal"})
    assert METHODS["gridprune"].parse_options({"alpha": "0.3"})["alpha"] == 0.3


def test_budget_from_ratio_rounds_half_up():
    assert budget_from_ratio(0.5, 5) == 3
    for grid in PRESET_GRIDS:
        assert budget_from_ratio(1.0, grid[0] * grid[1]) == grid[0] * grid[1]
