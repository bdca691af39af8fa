"""``prune-bench`` for Qwen2.5-VL (``bench_pipeline.py`` runs it): the torch-free Qwen runtime at the preset's
bucket size (the checkpoint's default image size)."""

from __future__ import annotations

from .bench_pipeline import FamilyBench, run_family_bench


def run_qwen_bench(args) -> dict:
    from vlmprune.runtime.anyres_pipeline import open_pipeline
    from vlmprune.runtime.pipeline import Timings

    from .bench import _image
    from .progress import Steps

    image = _image(args.image)

    def feeds(pipe, bucket):  # GridPrune's auxiliary-CLIP view and text embeddings included
        return pipe.vision_feeds(pipe.qwen_preprocess(image), image, bucket, args.prompt, Timings())

    family = FamilyBench(name="Qwen2.5-VL", scope="the default image size",
                         open_pipeline=lambda bundle, threads: open_pipeline(bundle, threads=threads), feeds=feeds,
                         row_fields=lambda bucket: {"image_size": bucket.get("image_size")})
    report = run_family_bench(args, family, image, Steps())
    report["image_size"] = report["rows"][0]["image_size"] if report["rows"] else None
    return report
