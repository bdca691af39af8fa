"""Training-free visual-token pruning methods, as traceable static-shape modules and as plain functions.

Functional API (kept indices [B, K], ascending):
``fopru_select``, ``gprune_select``, ``gridprune_select``, ``l2norm_select``; the registry ``METHODS``.
"""

from .base import PruneModule
from .context import ScoreContext, TensorContext, cls_attention, head_mean_attention
from .fopru import fopru_select
from .gprune import gprune_select
from .gridprune import gridprune_select
from .l2norm import l2norm_select
from .registry import METHODS, MethodSpec, Option, budget_from_ratio, get_method

__all__ = [
    "METHODS",
    "MethodSpec",
    "Option",
    "PruneModule",
    "ScoreContext",
    "TensorContext",
    "budget_from_ratio",
    "cls_attention",
    "fopru_select",
    "get_method",
    "gprune_select",
    "gridprune_select",
    "head_mean_attention",
    "l2norm_select",
]
