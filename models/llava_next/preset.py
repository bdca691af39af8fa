"""LLaVA-NeXT presets: LLaVA-1.5's writer with the anyres processor, config and pinpoints."""

from __future__ import annotations

from pathlib import Path

from vlmprune.models.llava.preset import write_preset as write_llava
from vlmprune.models.presets import PresetSpec


def write_preset(spec: PresetSpec, folder: Path) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from vlmprune.models.llava_next.adapter import next_processor

    processor, ids, vocab = next_processor(spec.image_size, spec.patch_size, spec.max_context, spec.grid_pinpoints)
    extra = {"image_grid_pinpoints": [list(p) for p in spec.grid_pinpoints]}
    write_llava(spec, folder, (processor, ids, vocab, LlavaNextConfig, LlavaNextForConditionalGeneration, extra))
