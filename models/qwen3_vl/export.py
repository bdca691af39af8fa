"""Qwen3-VL's export hooks: Qwen2.5-VL's (static image-size buckets, the auxiliary CLIP's constants) with this
family's vision graphs (``deepstack_embeds`` beside the kept tokens, validated like them), its DeepStack decoder,
and the manifest's word on the fused decoder (ONNX Runtime GenAI's Qwen3-VL text model has no DeepStack input)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vlmprune.errors import VlmpruneError
from vlmprune.export.onnx_io import WeightsFile
from vlmprune.export.validate import TOLERANCE, _compare, _indices, _session
from vlmprune.models.qwen2_5_vl.export import QwenExport, fp16_visual, validation_cases

OUTPUTS = ["image_embeds", "deepstack_embeds", "kept_indices"]
# onnxruntime-genai 0.18 models/builders/qwen.py: Qwen3VLTextModel's inputs are the base Model's (inputs_embeds,
# attention_mask, position_ids, the cache); nothing adds DeepStack rows at the visual positions.
FUSED_MISSING = ("ONNX Runtime GenAI's model builder (Qwen3VLTextModel) takes no DeepStack input, so its decoder "
                 "would drop the DeepStack features; the bundle has the plain decoder only")


def validate_qwen3_graph(path: Path, module, adapter, precision: str, text_embeds=None) -> list:
    """Each output of the ONNX graph against its PyTorch module, on the sample image and random input; where the
    two keep different tokens (fp16 near-ties), the embeddings of the tokens both kept."""
    tol = TOLERANCE[precision]
    sess = _session(path)
    checks = []
    uses_text = module.uses_text
    for case, pixels in validation_cases(adapter, clip=uses_text).items():
        args = (*pixels, text_embeds) if uses_text else pixels
        with torch.no_grad():
            ref = dict(zip(OUTPUTS, (t.numpy() for t in module(*args))))
        names = ["pixel_values", "clip_pixel_values", "text_embeds"] if uses_text else ["pixel_values"]
        got = dict(zip(OUTPUTS, sess.run(OUTPUTS, {n: a.numpy() for n, a in zip(names, args)})))
        idx = _indices(path.name, case, ref["kept_indices"], got["kept_indices"], tol)
        checks.append(idx)
        ref_idx, got_idx = ref["kept_indices"][0].tolist(), got["kept_indices"][0].tolist()
        common = sorted(set(ref_idx) & set(got_idx))
        r_rows, o_rows = [ref_idx.index(i) for i in common], [got_idx.index(i) for i in common]
        suffix = "" if idx.indices_equal else " (common tokens)"
        checks.append(_compare(path.name, case, "image_embeds" + suffix, ref["image_embeds"][0][r_rows],
                               got["image_embeds"][0][o_rows], tol))
        checks.append(_compare(path.name, case, "deepstack_embeds" + suffix, ref["deepstack_embeds"][:, r_rows],
                               got["deepstack_embeds"][:, o_rows], tol))
    return checks


def export_qwen3_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp: Path, scratch: Path, steps,
                        checks: list) -> tuple[list[dict], dict]:
    from vlmprune.export.exporter import _export_streamed, _finish_graph
    from vlmprune.models.qwen3_vl.graphs import Qwen3VisionGraph

    if needs_text and text_embeds is None:
        raise VlmpruneError("GridPrune on Qwen3-VL needs the prompt's CLIP embedding for its validation",
                            "report this as a bug")
    if getattr(req, "fused_decoder", None):
        raise VlmpruneError(f"--fused-decoder cannot be made for Qwen3-VL: {FUSED_MISSING}",
                            "leave out --fused-decoder")
    records, lint = [], {}
    vcfg = adapter.model.config.vision_config
    with WeightsFile(tmp / "vision.weights") as weights:
        for bucket in buckets:
            adapter.set_image_size(bucket.image_size)
            n = bucket.image_size[0] * bucket.image_size[1] // adapter.vision.patch_size**2
            pixels = torch.zeros(n, 3 * vcfg.temporal_patch_size * vcfg.patch_size**2)
            with steps.step(f"export vision graph {bucket.name}"):
                module = Qwen3VisionGraph(adapter, bucket.method, bucket.k, dict(bucket.options)).eval()
                if module.k != bucket.k:
                    raise AssertionError(f"{bucket.name}: module returns K={module.k}")
                args, names = (pixels,), ["pixel_values"]
                if module.uses_text:
                    side = adapter.clip_image_size
                    args += (torch.zeros(1, 3, side, side), torch.zeros(1, adapter.clip.projection_dim))
                    names += ["clip_pixel_values", "text_embeds"]
                with fp16_visual(adapter) if req.precision == "fp16" else contextlib.nullcontext():
                    model = _export_streamed(module, args, scratch / bucket.file, weights, input_names=names,
                                             output_names=OUTPUTS, opset=target.opset)
                inputs, outputs = _finish_graph(model, bucket.file, tmp, scratch, weights, target, lint)
                del model
            records.append({"name": bucket.name, "method": bucket.method, "keep": bucket.keep, "k": bucket.k,
                            "options": dict(bucket.options), "file": bucket.file, "inputs": inputs,
                            "outputs": outputs, "image_size": list(bucket.image_size),
                            "grid": list(adapter.vision.views[0].grid)})
            if req.validate:
                with steps.step(f"validate {bucket.file}"):
                    checks += validate_qwen3_graph(tmp / bucket.file, module, adapter, req.precision, text_embeds)
    steps.log(f"fused decoder: not made for Qwen3-VL: {FUSED_MISSING}")
    req.fused_decoder = False  # said here once, with the reason; the generic step would only say "unknown model"
    return records, lint


class Qwen3Export(QwenExport):
    """Qwen2.5-VL's buckets and auxiliary CLIP; Qwen3-VL's vision graphs and DeepStack decoder."""

    def export_vision(self, req, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps, checks):
        return export_qwen3_vision(req, adapter, buckets, target, needs_text, text_embeds, tmp, scratch, steps,
                                   checks)

    def decoder_module(self, adapter):
        from vlmprune.models.qwen3_vl.decoder import Qwen3DecoderGraph

        return Qwen3DecoderGraph(adapter).eval()

    def manifest_extras(self, manifest, adapter, spec, tmp):
        super().manifest_extras(manifest, adapter, spec, tmp)
        manifest["deepstack"] = {"levels": adapter.deepstack_levels,
                                 "visual_indexes": [int(i) for i in
                                                    adapter.model.config.vision_config.deepstack_visual_indexes]}
        manifest["decoder_fused_missing"] = FUSED_MISSING
