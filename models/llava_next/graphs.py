"""LLaVA-NeXT (anyres) vision graphs: one static graph per pinpoint layout and keep ratio (``specs/methods.md``,
"LLaVA-NeXT").

Inputs: ``pixel_values [V, 3, S, S]`` (the base view, then the rows x cols crops row-major) and ``valid_mask
[rows*side, cols*side]`` float (1 where the unpadding keeps a raster position: it depends on the image, so it is an
input), plus ``text_embeds`` for text-guided methods. Outputs, in transformers' order: ``base_embeds [1, Kb, D]``,
``base_indices [1, Kb]`` (ascending), ``raster_embeds [1, Kr, D]``, ``raster_indices [1, Kr]`` (ascending raster
positions ``r * cols*side + c`` of the padded raster) and ``raster_count [1]``: how many of the Kr raster slots hold
kept tokens (the rest are padding of the static shape). The budget of the raster follows the image's own valid
token count, ``round(keep * n_valid)``, computed in the graph; invalid positions are never selected.

Per method: ``none`` keeps everything valid; G-Prune scores the base view and the whole unpadded raster as two
graphs-in-one (the raster's cosine graph has no edge to an invalid position); FoPru scores each view with its own
attention, the same ratio per view (the crops' budgets from their valid counts). ``image_newline`` is not an
output: it is one constant vector the runtime appends after every unpadded row, outside every budget.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmprune.errors import VlmpruneError
from vlmprune.prune.context import cls_attention
from vlmprune.prune.fopru import scores_from_qk
from vlmprune.prune.gprune import gprune_scores
from vlmprune.prune.gridprune import _PROB_FLOOR, _zone_tensors, gridprune_from_scores
from vlmprune.prune.registry import budget_from_ratio
from vlmprune.prune.select import (_F32_MAX, ascending_from_mask, gather_tokens, l2_norm, l2_normalize, rank_desc,
                                   topk_ascending)
from vlmprune.models.llava_next.geometry import Layout

METHODS = ("none", "gprune", "fopru", "gridprune")
OUTPUTS = ["base_embeds", "base_indices", "raster_embeds", "raster_indices", "raster_count"]


def check_method(name: str, options: dict) -> None:
    if name not in METHODS:
        raise VlmpruneError(f"method {name!r} is not available for LLaVA-NeXT (anyres) yet",
                            f"use one of {', '.join(m for m in METHODS if m != 'none')}")
    if name == "fopru" and options.get("strategy", "rank") != "rank":
        raise VlmpruneError("FoPru strategy=row is not available for LLaVA-NeXT (the crops are unpadded per image)",
                            "use strategy=rank")


def part_budgets(method: str, keep: float, layout: Layout) -> tuple[int, int]:
    """Static (Kb, Kr): the base view's K and the raster's slot count (the most a raster of this layout keeps)."""
    n = layout.side * layout.side
    crops = layout.rows * layout.cols
    if method == "none":
        return n, crops * n
    kb = budget_from_ratio(keep, n)
    if method in ("fopru", "gridprune"):  # per view: each crop keeps at most round(keep * 576)
        return kb, crops * kb
    return kb, budget_from_ratio(keep, crops * n)


def dynamic_budget(keep: float, n_valid: Tensor) -> Tensor:
    """``max(1, round(keep * n))`` with halves up, in the graph (0 where nothing is valid)."""
    k = torch.floor(n_valid * keep + 0.5)
    return torch.where(n_valid > 0, torch.clamp(k, min=1.0), torch.zeros_like(k))


def select_masked(scores: Tensor, valid: Tensor, k: Tensor, slots: int) -> Tensor:
    """``[B, N]`` scores, ``valid`` bool, dynamic ``k`` [B]: the k best valid entries in the first slots, ascending."""
    masked = torch.where(valid, scores.float(), torch.tensor(-_F32_MAX))
    kept = (rank_desc(masked) < k.unsqueeze(-1)) & valid
    return ascending_from_mask(kept, slots)


def gprune_scores_masked(features: Tensor, valid: Tensor, threshold: float, temperature: float,
                         iterations: int) -> Tensor:
    """G-Prune over the valid tokens only: invalid tokens have no edges and start with zero weight, which gives the
    scores of the valid subset's own graph (``prune/gprune.py`` for the method itself)."""
    x = features.float()
    v = valid.float()
    weight = l2_norm(x) * v
    xn = l2_normalize(x)
    cos = torch.matmul(xn, xn.transpose(-1, -2))
    pair = v.unsqueeze(-1) * v.unsqueeze(-2)
    mask = (cos >= threshold).float() * pair
    logits = torch.where(mask > 0, cos / temperature, torch.tensor(-5000.0, dtype=cos.dtype))
    p = torch.softmax(logits, dim=-1) * mask
    degree = torch.clamp(mask.sum(-1), min=1.0)
    w = weight
    for _ in range(int(iterations)):
        w = torch.matmul(w.unsqueeze(1), p).squeeze(1)
    return w / degree


def zone_budgets_dynamic(probs: Tensor, sizes: Tensor, k: Tensor, rounds: int) -> Tensor:
    """``prune.gridprune.zone_budgets`` with a per-row budget ``k`` [B] and per-row zone sizes [B, Z] (the valid
    tokens of each zone of a crop): largest-remainder rounding, capped at the sizes, the excess redistributed."""
    probs = probs + _PROB_FLOOR
    budgets = torch.zeros_like(probs)
    remaining = k.float()
    open_ = (sizes > 0).float()
    for _ in range(rounds):
        p_open = probs * open_
        share = p_open / torch.clamp(p_open.sum(-1, keepdim=True), min=1e-30) * remaining.unsqueeze(-1)
        base = torch.floor(share)
        extra_count = remaining - base.sum(-1)
        remainder = torch.where(open_ > 0, share - base, torch.full_like(share, -1.0))
        extra = ((rank_desc(remainder) < extra_count.unsqueeze(-1)) & (open_ > 0)).float()
        budgets = budgets + base + extra
        over = torch.relu(budgets - sizes)
        budgets = budgets - over
        remaining = over.sum(-1)
        open_ = (budgets < sizes).float()
    return budgets


def gridprune_crops(r: Tensor, s: Tensor, valid: Tensor, k: Tensor, grid, zones: int, tau: float) -> Tensor:
    """GridPrune on each crop [B = crops, N] with its own zones over its valid tokens: zone means and sizes count
    valid tokens only, a zone without any gets no budget. Returns the kept mask [B, N]."""
    ids, member, _ = _zone_tensors(grid, zones, r.device)
    v = valid.float()
    sizes = torch.matmul(v, member.t())  # [B, Z] valid tokens per zone
    zone_mean = torch.matmul(r * v, member.t()) / torch.clamp(sizes, min=1.0)
    logits = torch.where(sizes > 0, zone_mean / tau, torch.tensor(-1e30))
    probs = torch.softmax(logits, dim=-1) * (sizes > 0).float()
    budgets = zone_budgets_dynamic(probs, sizes, k, rounds=zones * zones)
    token_budget = torch.matmul(budgets, member)
    same_zone = ids.unsqueeze(0) == ids.unsqueeze(1)
    masked = torch.where(valid, s.float(), torch.tensor(-_F32_MAX))
    return (rank_desc(masked, same_zone) < token_budget) & valid


def to_raster(x: Tensor, layout: Layout) -> Tensor:
    """[crops, side*side, ...] (crop-major) -> [1, rows*side * cols*side, ...] (raster row-major), as transformers'
    ``pack_image_features`` lays the crops out."""
    r, c, s = layout.rows, layout.cols, layout.side
    rest = x.shape[2:]
    y = x.reshape(r, c, s, s, *rest).transpose(1, 2)  # [r, s, c, s, ...]
    return y.reshape(1, r * s * c * s, *rest)


def to_crops(x: Tensor, layout: Layout) -> Tensor:
    """The inverse of ``to_raster`` for [rows*side, cols*side] -> [crops, side*side]."""
    r, c, s = layout.rows, layout.cols, layout.side
    return x.reshape(r, s, c, s).transpose(1, 2).reshape(r * c, s * s)


class _Selection(nn.Module):
    """The pruning part of an anyres graph, a submodule named ``method`` so that its ONNX nodes are scoped
    ``/method/`` as in the single-view graphs: the family's fp32 scopes pin them in fp16 engines (prune-build) and
    keep them out of INT8 (prune-calibrate)."""

    def __init__(self, graph: "AnyresVisionGraph"):
        super().__init__()
        self.__dict__["graph"] = graph  # a plain reference, not a submodule: no cycle in the module tree

    def forward(self, hidden: Tensor, patches: Tensor, valid_mask: Tensor, text_embeds: Tensor | None):
        return self.graph.select(hidden, patches, valid_mask, text_embeds)


class AnyresVisionGraph(nn.Module):
    def __init__(self, adapter, layout: Layout, method: str, keep: float, options: dict | None = None):
        super().__init__()
        options = dict(options or {})
        check_method(method, options)
        self.adapter = adapter
        self.model = adapter.model  # registered so .to()/.half() and tracing reach the weights
        self.clip = adapter.clip.model if adapter.clip is not None else None
        self.layout = layout
        self.method_name = method
        self.method = _Selection(self)
        self.keep = float(keep)
        self.options = options
        self.kb, self.kr = part_budgets(method, keep, layout)
        self.n = layout.side * layout.side

    def forward(self, pixel_values: Tensor, valid_mask: Tensor, text_embeds: Tensor | None = None):
        a = self.adapter
        hidden = a.hidden_before_scoring(pixel_values)  # [V, T, C]
        features = a.scoring_layer(hidden)
        patches = a.select_patches(features)  # [V, N, C]
        return self.method(hidden, patches, valid_mask, text_embeds)

    def select(self, hidden: Tensor, patches: Tensor, valid_mask: Tensor, text_embeds: Tensor | None):
        a = self.adapter
        valid = (valid_mask > 0.5).reshape(1, -1)  # [1, R] raster order
        n_valid = valid.float().sum(-1)  # [1]
        lay = self.layout
        if self.method_name == "none":
            base_idx = torch.arange(self.n).unsqueeze(0)
            base = a.project(patches[0:1])
            raster = a.project(to_raster(patches[1:], lay)[0]).unsqueeze(0)
            raster_idx = ascending_from_mask(valid, self.kr)
            count = n_valid
        elif self.method_name == "gprune":
            o = self.options
            base_all = a.project(patches[0:1])
            base_idx = topk_ascending(gprune_scores(base_all, o["threshold"], o["temperature"], o["iterations"]),
                                      self.kb)
            base = gather_tokens(base_all, base_idx)
            raster_all = a.project(to_raster(patches[1:], lay)[0]).unsqueeze(0)
            scores = gprune_scores_masked(raster_all, valid, o["threshold"], o["temperature"], o["iterations"])
            count = dynamic_budget(self.keep, n_valid)
            raster_idx = select_masked(scores, valid, count, self.kr)
            raster = raster_all
        else:  # fopru and gridprune: per view
            q, k, scale = a.scoring_qk(hidden)
            valid_crop = to_crops(valid.reshape(lay.raster), lay)  # [crops, N]
            k_crop = dynamic_budget(self.keep, valid_crop.float().sum(-1))  # [crops]
            if self.method_name == "fopru":
                sig = scores_from_qk(q, k, scale, True, self.options.get("scores", "probs"))  # [V, N]
                base_idx = topk_ascending(sig[0:1], self.kb)
                masked = torch.where(valid_crop, sig[1:].float(), torch.tensor(-_F32_MAX))
                kept_crop = (rank_desc(masked) < k_crop.unsqueeze(-1)) & valid_crop
            else:  # GridPrune, Fig. 4: every sub-image with its own zones, relevance from the same prompt
                o = self.options
                if text_embeds is None:
                    raise ValueError("GridPrune needs text_embeds")
                from vlmprune.prune.gridprune import gridprune_scores

                attn = cls_attention(q, k, scale)  # [V, N]
                # saliency normalised over each view's valid tokens (the base view's are all valid)
                valid_views = torch.cat([torch.ones_like(valid_crop[0:1]), valid_crop])
                attn = torch.where(valid_views, attn, torch.zeros_like(attn))
                r, sc = gridprune_scores(a.joint_embeds(patches), text_embeds, attn, o["alpha"])
                grid = (lay.side, lay.side)
                base_idx = gridprune_from_scores(r[0:1], sc[0:1], self.kb, grid, o["zones"], o["tau"])
                kept_crop = gridprune_crops(r[1:], sc[1:], valid_crop, k_crop, grid, o["zones"], o["tau"])
            base = a.project(gather_tokens(patches[0:1], base_idx))
            kept = to_raster(kept_crop.unsqueeze(-1), lay)[..., 0]  # [1, R]
            raster_idx = ascending_from_mask(kept, self.kr)
            count = k_crop.sum().reshape(1)
            raster = to_raster(patches[1:], lay)[0].unsqueeze(0)  # pre-projector, gathered below
        raster_kept = gather_tokens(raster, raster_idx)
        if self.method_name in ("fopru", "gridprune"):
            raster_kept = a.project(raster_kept)
        return base.float(), base_idx, raster_kept.float(), raster_idx, count.to(torch.int64).reshape(1)
