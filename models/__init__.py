"""Model families (one folder each: ``llava/``, ``llava_next/``, ``qwen2_5_vl/``) and the machinery they share: the
registry, the adapter base, loading and the preset table.

Importing this package is torch-free, so the edge runtime can read the registry; the torch parts (adapters,
loading) import on first use of the names below.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ClipText": "adapter", "Preprocessing": "adapter", "TextSpec": "adapter", "ViewSpec": "adapter",
    "VisionSpec": "adapter", "VLMAdapter": "adapter",
    "load_clip": "loading", "load_model": "loading", "resolve_path": "loading",
    "PRESETS": "presets", "ensure_preset": "presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
