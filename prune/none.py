"""``none``: keep every token (K = N), the unpruned reference of every comparison."""

from __future__ import annotations

import torch

from .base import PruneModule


class KeepAll(PruneModule):
    name = "none"
    stage = "pre"

    def __init__(self, k, grid, has_cls=True):
        super().__init__(int(grid[0]) * int(grid[1]), grid, has_cls)

    def select(self, ctx):
        patches = ctx.patches
        return torch.arange(self.n, device=patches.device).unsqueeze(0).expand(patches.shape[0], -1)

    def forward(self, ctx):
        # No gather: the tokens pass through untouched.
        return self.select(ctx), ctx.patches
