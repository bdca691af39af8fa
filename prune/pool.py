"""``pool``: 2 x 2 average pooling of the patch grid (FoPru's "w/o significance" ablation), K = N / 4.

The tokens are averages, not a subset; ``kept_indices`` names the top-left patch of each window so that
visualisation and original-position stitching have an anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PruneModule


def pool_anchor_indices(grid: tuple[int, int]) -> list[int]:
    h, w = grid
    return [r * w + c for r in range(0, h, 2) for c in range(0, w, 2)]


class Pool(PruneModule):
    name = "pool"
    stage = "pre"

    def __init__(self, k, grid, has_cls=True):
        h, w = int(grid[0]), int(grid[1])
        if h % 2 or w % 2:
            raise ValueError(f"pool needs an even patch grid, got {h}x{w}")
        super().__init__(h * w // 4, grid, has_cls)
        self.register_buffer("anchors", torch.tensor(pool_anchor_indices((h, w))), persistent=False)

    def select(self, ctx):
        return self.anchors.unsqueeze(0).expand(ctx.patches.shape[0], -1)

    def forward(self, ctx):
        x = ctx.patches
        b, n, c = x.shape
        h, w = self.grid
        grid = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, kernel_size=2, stride=2)  # [B, C, h/2, w/2]
        return self.select(ctx), pooled.flatten(2).transpose(1, 2)
