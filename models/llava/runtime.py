"""LLaVA-1.5 at run time: the single-view defaults of ``runtime/family.py`` are this family's behaviour (the CLIP
crop, the K kept tokens in place of ``<image>``, ``[B, S]`` positions). Torch-free."""

from __future__ import annotations

from vlmprune.runtime.family import FamilyRuntime


class LlavaRuntime(FamilyRuntime):
    @classmethod
    def claims(cls, manifest: dict) -> bool:
        # bundles written before the manifest named its family: one CLIP view whose tokens replace the placeholder
        return (manifest["prompt"].get("stitch", "replace_placeholder") == "replace_placeholder"
                and manifest["preprocessing"].get("kind", "clip") == "clip")
