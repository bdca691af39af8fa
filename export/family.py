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

    def bucket_graph(self, adapter, bucket, needs_text: bool, text_embeds):
        """The bucket's module with its example inputs (``vision_export.BucketGraph``): the family's view through the
        vision tower cut at the feature layer, the method, the projector."""
        import torch

        from vlmprune.prune import get_method

        from .graphs import BucketVisionGraph
        from .vision_export import BucketGraph

        view = adapter.vision.views[0]
        method = get_method(bucket.method).build(bucket.k, view.grid, view.has_cls, **dict(bucket.options))
        if method.k != bucket.k:
            raise AssertionError(f"{bucket.name}: module returns K={method.k}")
        inputs = {"pixel_values": torch.zeros(1, 3, *view.image_size)}
        if bucket.method != "none" and needs_text:
            text_dim = adapter.clip.projection_dim if adapter.clip is not None else 0
            inputs["text_embeds"] = torch.zeros(1, text_dim)
        return BucketGraph(BucketVisionGraph(adapter, method).eval(), inputs, ["image_embeds", "kept_indices"])

    def validation_cases(self, adapter, bucket, graph, text_embeds) -> dict:
        """Inputs (by name) the written graph is checked on: the tool's sample image through the model's own
        processor, and random input."""
        import torch

        from vlmprune.sample import make_sample_image

        pixels = adapter.processor.image_processor(make_sample_image(), return_tensors="pt")["pixel_values"].float()
        g = torch.Generator().manual_seed(0)
        cases = {"sample image": {"pixel_values": pixels},
                 "random input": {"pixel_values": torch.randn(pixels.shape, generator=g)}}
        if "text_embeds" in graph.inputs:
            for case in cases.values():
                case["text_embeds"] = text_embeds
        return cases

    def half_precision(self, adapter):
        """The context the vision side runs in for an fp16 export (fp16 weights, the pruning and norms fp32)."""
        from .precision import fp16_vision

        return fp16_vision(adapter)

    def export_vision(self, req, adapter, buckets, target, needs_text, text_embeds, tmp: Path, scratch: Path, steps,
                      checks: list) -> tuple[list[dict], dict]:
        """Every bucket's vision graph, written into ``tmp`` and validated; their manifest records and lint."""
        from .vision_export import export_buckets

        return export_buckets(req, self, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps,
                              checks)

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
