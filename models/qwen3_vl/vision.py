"""Qwen3-VL's vision encoder at one static image size, in traceable pieces.

What differs from Qwen2.5-VL (``models/qwen2_5_vl/vision.py``): patch 16 with a bias, learned position embeddings
resampled (bilinear, align_corners) from their square table to the grid, LayerNorm blocks with full attention in
every block (no windows, so patches stay in the processor's order throughout), and DeepStack: the outputs of the
blocks ``deepstack_visual_indexes`` each go through their own merger (post-shuffle LayerNorm). At a static size
the resampling taps and weights and the rotary tables are constants, computed once with transformers' own helpers
(``transformers.vision_utils``) so they are the library's; the table itself stays a weight of the graph.

The methods of ``models/qwen2_5_vl/graphs.py`` read this module through the same attributes as Qwen2.5-VL's
(``scoring_qk``, ``group_mean``, ``merged_grid``), so they are reused as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Qwen3VisionStatic(nn.Module):
    """``visual`` (``Qwen3VLVisionModel``) at a ``grid`` of (gh, gw) pre-merge patches. Input: ``pixel_values``
    [N, C*T*P*P], the processor's flattened patches (merge groups in raster order, a group's patches consecutive)."""

    def __init__(self, visual, grid: tuple[int, int]):
        super().__init__()
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        cfg = visual.config
        self.visual = visual
        self.grid = (int(grid[0]), int(grid[1]))
        self.merge = int(cfg.spatial_merge_size)
        gh, gw = self.grid
        self.n = gh * gw
        self.merged_grid = (gh // self.merge, gw // self.merge)
        self.depth = int(cfg.depth)
        self.last_full = self.depth - 1  # every block attends globally: FoPru reads the last one
        self.deepstack = tuple(int(i) for i in cfg.deepstack_visual_indexes)
        self.num_heads = int(cfg.num_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        thw = torch.tensor([[1, gh, gw]])
        taps, weights = get_vision_interpolation_indices_and_weights(
            thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge)
        self.register_buffer("taps", taps, persistent=False)  # [N, 4] rows of the learned table, processor order
        self.register_buffer("tap_weights", weights.float(), persistent=False)
        positions = get_vision_position_ids(thw, self.merge)  # [N, 2] (h, w) in processor order
        cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)
        # the processor order is kept throughout (no windows): the identity, for code that undoes an order
        self.register_buffer("inverse", torch.arange(self.n), persistent=False)

    # --- pieces ----------------------------------------------------------------------------------------------
    def embed(self, pixel_values: Tensor) -> Tensor:
        """[N, C]: patch embeddings plus the resampled learned position embeddings. The Conv3d's kernel equals its
        stride and its input, so it is one MatMul over the flattened patch."""
        proj = self.visual.patch_embed.proj
        w = proj.weight
        x = pixel_values.to(w.dtype) @ w.reshape(w.shape[0], -1).t() + proj.bias
        table = self.visual.pos_embed.weight
        pos = (table[self.taps] * self.tap_weights[:, :, None].to(table.dtype)).sum(1)
        return x + pos.to(x.dtype)

    def _rotary(self, x: Tensor) -> Tensor:  # x [N, H, d]
        cos, sin = self.cos.unsqueeze(-2), self.sin.unsqueeze(-2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def qkv(self, block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q, k and v [H, N, d] of ``block`` from its input ``x`` [N, C]."""
        n = x.shape[0]
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        return self._rotary(q).transpose(0, 1), self._rotary(k).transpose(0, 1), v.transpose(0, 1)

    def block(self, index: int, x: Tensor) -> Tensor:
        blk = self.visual.blocks[index]
        q, k, v = self.qkv(blk, x)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * blk.attn.scaling, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs.to(v.dtype), v)  # [H, N, d]
        x = x + blk.attn.proj(out.transpose(0, 1).reshape(x.shape[0], -1))
        return x + blk.mlp(blk.norm2(x))

    def run(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(scoring_input, merged, deepstack)``: the input of the last block [N, C], the merger's output [M, D]
        and the DeepStack mergers' outputs [levels, M, D], M = N/4 in raster order of the merged grid."""
        x = self.embed(pixel_values)
        scoring_input, levels = x, []
        for i in range(self.depth):
            if i == self.last_full:
                scoring_input = x
            x = self.block(i, x)
            if i in self.deepstack:
                levels.append(self.visual.deepstack_merger_list[self.deepstack.index(i)](x))
        return scoring_input, self.merge_tokens(x), torch.stack(levels)

    def merge_tokens(self, x: Tensor) -> Tensor:
        return self.visual.merger(x)

    def scoring_qk(self, scoring_input: Tensor) -> tuple[Tensor, Tensor, float]:
        """Queries and keys [1, H, N, d] of the last block (processor order), recomputed in a side branch so the
        encoder's attention stays fusable."""
        blk = self.visual.blocks[self.last_full]
        q, k, _ = self.qkv(blk, scoring_input)
        return q.unsqueeze(0), k.unsqueeze(0), float(blk.attn.scaling)

    def group_mean(self, per_patch: Tensor) -> Tensor:
        """[B, N] per pre-merge patch -> [B, N/4]: the mean over each merge group (raster order of the merged grid)."""
        b = per_patch.shape[0]
        return per_patch.reshape(b, -1, self.merge**2).mean(-1)
