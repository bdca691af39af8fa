"""Model adapters (LLaVA-1.5 now; LLaVA-NeXT and Qwen2.5-VL fit the same interface), tiny presets, loading."""

from .adapter import ClipText, Preprocessing, TextSpec, ViewSpec, VisionSpec, VLMAdapter
from .loading import load_clip, load_model, resolve_path
from .presets import PRESETS, ensure_preset

__all__ = [
    "PRESETS",
    "ClipText",
    "Preprocessing",
    "TextSpec",
    "VLMAdapter",
    "ViewSpec",
    "VisionSpec",
    "ensure_preset",
    "load_clip",
    "load_model",
    "resolve_path",
]
