"""A pruned bundle as a plain ``generate(image, prompt) -> str`` model, for evaluation harnesses (lmms-eval,
VLMEvalKit) to wrap as a custom model, plus the scoring ``prune-eval`` uses. Torch-free, like the runtime.

    from vlmprune.runtime.api import PrunedVLM
    vlm = PrunedVLM("exports/llava-fopru", keep=0.25, max_new_tokens=64)
    answer = vlm.generate("photo.jpg", "What is on the table?")   # or a PIL image
    vlm.last.timings.ttft_ms                                       # the full Result of the last call
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlmprune.errors import ArgumentError

from .api_args import check_image, check_int, check_keep, check_options, check_prompt, message_parts
from .eval_data import load_dataset
from .eval_demo import make_demo_dataset
from .eval_metrics import agreement, exact_match, normalize_answer, token_f1, vqa_accuracy
from .pipeline import Result, open_bundle
from .preprocess import load_image

__all__ = ["PrunedVLM", "normalize_answer", "vqa_accuracy", "exact_match", "token_f1", "agreement", "load_dataset",
           "make_demo_dataset"]


class PrunedVLM:
    """One bundle and one bucket, greedy by default; the sessions open once and serve every call."""

    def __init__(self, bundle: str | Path, *, keep: float | None = None, max_new_tokens: int = 64,
                 engines: str | None = None, provider: str | None = None, threads: int | None = None,
                 positions: str | None = None, **unknown):
        if unknown:
            raise ArgumentError(f"unknown option {sorted(unknown)[0]!r}",
                                "the options are keep, max_new_tokens, engines, provider, threads, positions")
        keep = check_keep(keep)  # each bad argument: one ArgumentError (a VlmpruneError and a ValueError)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        threads = None if threads is None else check_int("threads", threads, 1)
        # positions None: the bundle's own, as prune-run and prune-eval use
        self.pipeline = open_bundle(bundle, provider=provider, threads=threads, positions=positions, engines=engines)
        self.bucket, self.bucket_choice = self.pipeline.choose_bucket(keep)  # None: the smallest pruned bucket
        self.pipeline.prepare(self.bucket)
        self.max_new_tokens = max_new_tokens
        self.last: Result | None = None

    @property
    def keep(self) -> float:
        return self.bucket["keep"]

    def generate(self, image: Image.Image | str | Path | np.ndarray, prompt: str, **options) -> str:
        """The answer text. ``options`` go to ``Pipeline.generate`` (``max_new_tokens``, ``temperature``,
        ``top_p``, ``seed``); the full ``Result`` (tokens, kept indices, timings) is kept in ``self.last``."""
        options = check_options(options)
        options.setdefault("max_new_tokens", self.max_new_tokens)
        image, prompt = check_image(image), check_prompt(prompt)
        image = image if isinstance(image, Image.Image) else load_image(image)
        # a multi-layout family answers each image with the bucket of its own layout at this keep ratio
        bucket, _ = self.pipeline.choose_bucket(self.bucket["keep"], image)
        self.last = self.pipeline.generate(image, prompt, bucket=bucket, **options)
        return self.last.text

    __call__ = generate

    def generate_message(self, message: list[dict], **options) -> str:
        """VLMEvalKit's message form: ``[{"type": "image", "value": PATH}, {"type": "text", "value": TEXT}]``.
        One image per prompt (the bundles take one); text parts are joined with newlines."""
        image, text = message_parts(message)
        return self.generate(image, text, **options)
