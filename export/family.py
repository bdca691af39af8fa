"""The export half of the family contract: the hooks ``export_bundle`` and ``prune-bench`` call, with the
single-view defaults (one view, one graph per budget bucket, the standard decoder). A family overrides only what
differs, in ``models/<family>/export.py``, as ONNX Runtime GenAI's builder subclasses its base ``Model``."""

from __future__ import annotations

from pathlib import Path


class FamilyExport:
    def __init__(self, family):
        self.family = family  # the registry's declaration

    # --- prune-export ------------------------------------------------------------------------------------------
    def plan(self, spec, options: dict, adapter, keeps, tokens, family_options: dict) -> list:
        """The budget buckets of this export."""
        from .buckets import plan_buckets

        view = adapter.vision.views[0]
        return plan_buckets(spec, options, view.num_patches, view.grid, keeps, tokens)

    def export_vision(self, req, adapter, buckets, target, needs_text, text_embeds, tmp: Path, scratch: Path, steps,
                      checks: list) -> tuple[list[dict], dict]:
        """Every bucket's vision graph, written into ``tmp`` and validated; their manifest records and lint."""
        from .exporter import export_vision

        return export_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps, checks)

    def decoder_module(self, adapter):
        """The KV-cache decoder graph's module (``position_ids [B, S]``)."""
        from .decoder import DecoderGraph

        return DecoderGraph(adapter).eval()

    def manifest_extras(self, manifest: dict, adapter, spec, tmp: Path) -> None:
        """The family's own manifest fields and files (written into ``tmp``)."""

    # --- prune-bench -------------------------------------------------------------------------------------------
    def bench_export_options(self, model: str, image) -> tuple[dict, str]:
        """``(family_options, a line saying what they cover)`` for the bench's export of ``model`` on ``image``."""
        return {}, ""

    def bench_targets(self, rows: list[dict]) -> list[dict]:
        """This family's own speed targets, measured on the bench rows."""
        return []
