"""The module form of a pruning method: static K fixed at construction, traceable to ONNX."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .context import ScoreContext
from .select import gather_tokens


class PruneModule(nn.Module):
    """Selects ``k`` of the ``N = h * w`` patch tokens of one view.

    ``stage`` says where the kept tokens are gathered: ``"pre"`` before the projector (the projector then runs on
    K tokens only), ``"post"`` after it (the method scores post-projector features).
    ``forward`` returns ``(kept_indices [B, K] int64 ascending, tokens [B, K, C])`` where the tokens are
    pre-projector features for ``"pre"`` and post-projector features for ``"post"``.
    """

    name: str = ""
    stage: Literal["pre", "post"] = "post"

    def __init__(self, k: int, grid: tuple[int, int], has_cls: bool = True):
        super().__init__()
        h, w = int(grid[0]), int(grid[1])
        n = h * w
        if not 1 <= k <= n:
            raise ValueError(f"K={k} is outside 1..N={n}")
        self.k = int(k)
        self.grid = (h, w)
        self.n = n
        self.has_cls = has_cls

    def select(self, ctx: ScoreContext) -> Tensor:
        raise NotImplementedError

    def forward(self, ctx: ScoreContext) -> tuple[Tensor, Tensor]:
        indices = self.select(ctx)
        source = ctx.patches if self.stage == "pre" else ctx.projected
        return indices, gather_tokens(source, indices)

    def extra_repr(self) -> str:
        return f"k={self.k}, grid={self.grid}, stage={self.stage}"
