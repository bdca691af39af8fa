"""The registered presets' patch grids from their specs alone (nothing written or loaded), for module-level
parametrisation; tests/test_presets.py checks them against every loaded preset's views."""

from __future__ import annotations

from fractions import Fraction
from math import floor

from vlmprune.models.presets import PRESETS, PresetSpec

def preset_grid(spec: PresetSpec) -> tuple[int, int]:
    """(h, w) tokens of the preset's (base) view: LLaVA's patch grid, or Qwen2.5-VL's merged grid at its bucket."""
    side = spec.image_size // spec.patch_size // spec.spatial_merge  # Qwen2.5-VL: one token per merged 2x2 window
    return side, side


def preset_tokens(name: str) -> tuple[int, tuple[int, int]]:
    """``(N, grid)`` of a preset's (base) view."""
    grid = preset_grid(PRESETS[name])
    return grid[0] * grid[1], grid


PRESET_GRIDS = sorted({preset_grid(spec) for spec in PRESETS.values()})


def grid_id(grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def spec_k(keep: float, n: int) -> int:
    """``K = max(1, round(keep * N))`` with halves up (specs/methods.md), in exact decimal arithmetic: an expected
    value computed apart from the float formula in prune/registry.py."""
    return max(1, floor(Fraction(str(keep)) * n + Fraction(1, 2)))
