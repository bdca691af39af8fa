"""Qwen2.5-VL vision graphs: one static graph per image size and budget bucket (``export/qwen_graphs.py``), written
the exporter's way (weights streamed into one shared ``vision.weights``, linted for every TensorRT target, each graph
validated in ONNX Runtime against its PyTorch module as soon as it is written)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vlmprune.errors import VlmpruneError

from vlmprune.export.buckets import Bucket, plan_buckets
from vlmprune.export.family import FamilyExport
from vlmprune.export.vision_export import BucketGraph


@dataclass(frozen=True)
class QwenBucket(Bucket):
    """A bucket at one static image size (h, w); names carry the size so several sizes share one bundle."""

    image_size: tuple[int, int] = (448, 448)

    @property
    def size_tag(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}"

    @property
    def name(self) -> str:
        return f"{self.method}-{self.size_tag}-k{self.k}"

    @property
    def file(self) -> str:
        return f"vision_{self.method}_{self.size_tag}_k{self.k}.onnx"


def plan_qwen(spec, options: dict, adapter, keeps=(), tokens=(), image_sizes=None) -> list[QwenBucket]:
    """Buckets for every image size (default: the adapter's, 448x448), the ``none`` reference first per size."""
    sizes = list(image_sizes or [adapter.image_size])
    out = []
    for size in sizes:
        adapter.set_image_size(size)
        view = adapter.vision.views[0]
        for b in plan_buckets(spec, options, view.num_patches, view.grid, keeps, tokens):
            out.append(QwenBucket(b.method, b.keep, b.k, b.options, tuple(size)))
    return out


@contextlib.contextmanager
def fp16_visual(adapter):
    """The encoder and merger in fp16 with fp32 RMSNorms (as the family's fp32 scopes pin them in TensorRT); the
    exact fp32 weights are restored afterwards."""
    visual = adapter.visual
    saved = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    hooks = []
    try:
        visual.half()
        for module in visual.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.float()
                hooks.append(module.register_forward_pre_hook(lambda mod, args: (args[0].float(),)))
                hooks.append(module.register_forward_hook(lambda mod, args, out: out.half()))
        yield
    finally:
        for h in hooks:
            h.remove()
        visual.float()
        visual.load_state_dict(saved)


def validation_cases(adapter, seed: int = 0, clip: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """The tool's sample image through the runtime's own preprocessing at the bucket size (and the auxiliary CLIP's
    view of it for GridPrune), and random input."""
    from vlmprune.models.qwen2_5_vl.preprocess import QwenPreprocessor, clip_view
    from vlmprune.sample import make_sample_image

    image = make_sample_image()
    pixels = (torch.from_numpy(QwenPreprocessor(adapter.preprocessing.to_dict())(image)),)
    if clip:
        pixels += (torch.from_numpy(clip_view(image, adapter.clip_constants())),)
    g = torch.Generator().manual_seed(seed)
    return {"sample image": pixels, "random input": tuple(torch.randn(p.shape, generator=g) for p in pixels)}


def qwen_manifest(manifest: dict, adapter, spec) -> None:
    """The Qwen-specific parts of a bundle manifest: the auxiliary CLIP's preprocessing (GridPrune) and the default
    positions of the method (the runtime computes the M-RoPE positions from the buckets' grid and these)."""
    if "text" in spec.needs:
        manifest["auxiliary_clip"] = adapter.clip_constants()


class QwenExport(FamilyExport):
    """Buckets at a static image size, Qwen's vision graphs, the M-RoPE decoder, the auxiliary CLIP's constants."""

    def plan(self, spec, options, adapter, keeps, tokens, family_options):
        sizes = family_options.get("image_sizes")
        if sizes and len(set(map(tuple, sizes))) > 1:
            raise VlmpruneError("a bundle holds one image size for now", "give one --image-size, e.g. 448x448")
        return plan_qwen(spec, options, adapter, keeps, tokens, sizes)

    def bucket_graph(self, adapter, bucket, needs_text, text_embeds):
        """Flattened patches at the bucket's image size (and GridPrune's auxiliary-CLIP view and prompt
        embedding); the records carry the image size and merged grid."""
        if needs_text and text_embeds is None:
            raise VlmpruneError(f"GridPrune on {self.family.name} needs the prompt's CLIP embedding for its "
                                "validation", "report this as a bug")
        adapter.set_image_size(bucket.image_size)
        n = bucket.image_size[0] * bucket.image_size[1] // adapter.vision.patch_size**2
        vcfg = adapter.model.config.vision_config
        module = self.vision_module(adapter, bucket)
        if module.k != bucket.k:
            raise AssertionError(f"{bucket.name}: module returns K={module.k}")
        inputs = {"pixel_values": torch.zeros(n, 3 * vcfg.temporal_patch_size * vcfg.patch_size**2)}
        if module.uses_text:  # GridPrune: the auxiliary CLIP's view of the image and the prompt embedding
            side = adapter.clip_image_size
            inputs["clip_pixel_values"] = torch.zeros(1, 3, side, side)
            inputs["text_embeds"] = torch.zeros(1, adapter.clip.projection_dim)
        return BucketGraph(module, inputs, list(self.vision_outputs),
                           {"image_size": list(bucket.image_size), "grid": list(adapter.vision.views[0].grid)})

    vision_outputs = ("image_embeds", "kept_indices")

    def vision_module(self, adapter, bucket):
        """The bucket's graph module (at the adapter's current image size)."""
        from vlmprune.models.qwen2_5_vl.graphs import QwenVisionGraph

        return QwenVisionGraph(adapter, bucket.method, bucket.k, dict(bucket.options)).eval()

    def validation_cases(self, adapter, bucket, graph, text_embeds):
        adapter.set_image_size(bucket.image_size)
        uses_text = "text_embeds" in graph.inputs
        cases = {}
        for case, pixels in validation_cases(adapter, clip=uses_text).items():
            names = ["pixel_values", "clip_pixel_values"] if uses_text else ["pixel_values"]
            cases[case] = dict(zip(names, pixels))
            if uses_text:
                cases[case]["text_embeds"] = text_embeds
        return cases

    def half_precision(self, adapter):
        return fp16_visual(adapter)

    def decoder_module(self, adapter):
        from vlmprune.models.qwen2_5_vl.decoder import QwenDecoderGraph

        return QwenDecoderGraph(adapter).eval()

    def manifest_extras(self, manifest, adapter, spec, tmp):
        qwen_manifest(manifest, adapter, spec)
