"""LLaVA-1.5 at export: the single-view defaults of ``export/family.py`` are this family's behaviour."""

from __future__ import annotations

from vlmprune.export.family import FamilyExport


class LlavaExport(FamilyExport):
    pass
