"""Qwen2.5-VL's vision encoder at one static image size, in traceable pieces.

transformers computes the window index, the rotary tables and the attention spans from ``grid_thw`` at every call
(Python loops, ``cu_seqlens`` splits). At a static size they are constants, computed here once with transformers'
own helpers (so the windows are the library's windows) and stored as buffers:

- ``perm``: the window-order permutation of the patches (merge groups in window order, 4 patches each);
- ``cos``/``sin``: the 2-D rotary tables, already in window order;
- the windows: equal-length windows become a reshape to ``[windows, L]`` (plain batched attention); ragged
  windows (a side not a multiple of the window) use one block-diagonal additive mask.

The permutation is undone before the merger, so merged tokens come out in raster order of the merged grid (what
transformers returns after ``reverse_indices``) and every pruning index is a raster index of that grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# A masked logit: exp() of it is exactly 0 in fp32 and it stays finite in fp16 (TensorRT engines).
_MASKED = -30000.0


class QwenVisionStatic(nn.Module):
    """``visual`` (``Qwen2_5_VisionTransformerPretrainedModel``) at a ``grid`` of (gh, gw) pre-merge patches.

    Input: ``pixel_values`` [N, C*T*P*P], the processor's flattened patches (merge groups in raster order, the four
    patches of a group consecutive). Every tensor below with N rows is in window order unless it says otherwise.
    """

    def __init__(self, visual, grid: tuple[int, int]):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        cfg = visual.config
        self.visual = visual
        self.grid = (int(grid[0]), int(grid[1]))
        self.merge = int(cfg.spatial_merge_size)
        unit = self.merge**2
        gh, gw = self.grid
        self.n = gh * gw
        self.merged_grid = (gh // self.merge, gw // self.merge)
        self.full_blocks = tuple(int(i) for i in cfg.fullatt_block_indexes)
        self.last_full = max(i for i in self.full_blocks if i < cfg.depth)
        self.num_heads = int(cfg.num_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        thw = torch.tensor([[1, gh, gw]])
        window_index, cu = get_vision_window_index(thw, self.merge, cfg.window_size, cfg.patch_size)
        perm = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)  # patches, window order
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", torch.argsort(perm), persistent=False)
        positions = get_vision_position_ids(thw, self.merge)  # [N, 2] (h, w) in processor order
        cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)
        self.register_buffer("cos", cos[perm].float(), persistent=False)
        self.register_buffer("sin", sin[perm].float(), persistent=False)
        lengths = (cu[1:] - cu[:-1]).tolist()
        self.window_lengths = tuple(int(x) for x in lengths)
        self.uniform = len(set(lengths)) == 1
        if not self.uniform:
            ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            mask = torch.where(ids[:, None] == ids[None, :], 0.0, _MASKED)
            self.register_buffer("window_mask", mask, persistent=False)

    # --- pieces ----------------------------------------------------------------------------------------------
    def embed(self, pixel_values: Tensor) -> Tensor:
        """[N, C] patch embeddings in window order. The Conv3d's kernel equals its stride and its input, so it is
        one MatMul over the flattened patch (no 5-D convolution in the graph)."""
        w = self.visual.patch_embed.proj.weight
        x = pixel_values.to(w.dtype) @ w.reshape(w.shape[0], -1).t()
        return x[self.perm]

    def _rotary(self, x: Tensor) -> Tensor:  # x [N, H, d], window order
        cos, sin = self.cos.unsqueeze(-2), self.sin.unsqueeze(-2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def qkv(self, block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q, k and v [H, N, d] of ``block`` from its input ``x`` [N, C]."""
        n = x.shape[0]
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        return self._rotary(q).transpose(0, 1), self._rotary(k).transpose(0, 1), v.transpose(0, 1)

    def attention(self, block, x: Tensor, full: bool) -> Tensor:
        q, k, v = self.qkv(block, x)
        scale = block.attn.scaling
        h, n, d = q.shape
        if full or len(self.window_lengths) == 1:
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
            out = torch.matmul(probs.to(v.dtype), v)  # [H, N, d]
        elif self.uniform:
            L = self.window_lengths[0]
            qw, kw, vw = (t.reshape(h, n // L, L, d) for t in (q, k, v))
            probs = torch.softmax(torch.matmul(qw, kw.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
            out = torch.matmul(probs.to(v.dtype), vw).reshape(h, n, d)
        else:
            logits = torch.matmul(q, k.transpose(-1, -2)) * scale + self.window_mask
            out = torch.matmul(torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype), v)
        return block.attn.proj(out.transpose(0, 1).reshape(n, h * d))

    def block(self, index: int, x: Tensor) -> Tensor:
        blk = self.visual.blocks[index]
        x = x + self.attention(blk, x, index in self.full_blocks)
        return x + blk.mlp(blk.norm2(x))

    def run(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``(scoring_input, merged)``: the input of the last full-attention block [N, C] (window order) and the
        merger's output [N/4, D] in raster order of the merged grid."""
        x = self.embed(pixel_values)
        scoring_input = x
        for i in range(len(self.visual.blocks)):
            if i == self.last_full:
                scoring_input = x
            x = self.block(i, x)
        return scoring_input, self.merge_tokens(x[self.inverse])

    def merge_tokens(self, x: Tensor) -> Tensor:
        """The 2x2 merger over patches in processor order (each group's four patches consecutive)."""
        return self.visual.merger(x)

    def scoring_qk(self, scoring_input: Tensor) -> tuple[Tensor, Tensor, float]:
        """Queries and keys [1, H, N, d] of the last full-attention block, in processor order (the window
        permutation undone), recomputed in a side branch so the encoder's attention stays fusable."""
        blk = self.visual.blocks[self.last_full]
        q, k, _ = self.qkv(blk, scoring_input)
        return q[:, self.inverse].unsqueeze(0), k[:, self.inverse].unsqueeze(0), float(blk.attn.scaling)

    def group_mean(self, per_patch: Tensor) -> Tensor:
        """[B, N] per pre-merge patch (processor order) -> [B, N/4]: the mean over each 2x2 merge group, in raster
        order of the merged grid."""
        b = per_patch.shape[0]
        return per_patch.reshape(b, -1, self.merge**2).mean(-1)
