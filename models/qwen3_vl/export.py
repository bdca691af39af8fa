"""Qwen3-VL's export hooks: Qwen2.5-VL's (static image-size buckets, the auxiliary CLIP's constants) with this
family's vision graphs (``deepstack_embeds`` beside the kept tokens, validated like them by the one comparison) and
its DeepStack decoder. The fused decoder is declared missing in the family (ONNX Runtime GenAI's Qwen3-VL text
model has no DeepStack input), so the exporter skips or refuses it with that reason."""

from __future__ import annotations

from vlmprune.models.qwen2_5_vl.export import QwenExport

OUTPUTS = ["image_embeds", "deepstack_embeds", "kept_indices"]


class Qwen3Export(QwenExport):
    """Qwen2.5-VL's buckets and auxiliary CLIP; Qwen3-VL's vision graphs and DeepStack decoder."""

    vision_outputs = tuple(OUTPUTS)

    def vision_module(self, adapter, bucket):
        from vlmprune.models.qwen3_vl.graphs import Qwen3VisionGraph

        return Qwen3VisionGraph(adapter, bucket.method, bucket.k, dict(bucket.options)).eval()

    def decoder_module(self, adapter):
        from vlmprune.models.qwen3_vl.decoder import Qwen3DecoderGraph

        return Qwen3DecoderGraph(adapter).eval()

    def manifest_extras(self, manifest, adapter, spec, tmp):
        super().manifest_extras(manifest, adapter, spec, tmp)
        manifest["deepstack"] = {"levels": adapter.deepstack_levels,
                                 "visual_indexes": [int(i) for i in
                                                    adapter.model.config.vision_config.deepstack_visual_indexes]}
