"""Resolve what the user named (a preset, a local folder, a Hugging Face id in the local cache) and load it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmprune.errors import VlmpruneError

from .adapter import ClipText, VLMAdapter
from .presets import PRESETS, ensure_preset

# model_type in config.json -> adapter; the ones not built yet say so rather than failing deep in transformers.
_ARCHES = {"llava": "LLaVA-1.5"}
_PLANNED = {"llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL", "llava_onevision": "LLaVA-OneVision"}


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_path(name_or_path: str, what: str = "model") -> Path:
    """A folder holding config.json: a preset, a local folder, or a hub id found in the local cache (offline)."""
    if name_or_path in PRESETS:
        return ensure_preset(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise VlmpruneError(f"{what} folder {path} has no config.json", "point at a Hugging Face model folder")
        return path
    if path.exists():
        raise VlmpruneError(f"{what} path {path} is a file, not a folder", "point at the model's folder")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            pass
    presets = ", ".join(PRESETS)
    raise VlmpruneError(
        f"{what} {name_or_path!r} not found: not a built-in preset ({presets}), not a local folder, "
        f"and not in the Hugging Face cache at {_hf_cache_dir()}",
        f"download it with `huggingface-cli download {name_or_path}` where there is network, or pass a local folder",
    )


def _model_type(path: Path) -> str:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmpruneError(f"cannot read {path / 'config.json'}: {exc}", "check the model folder") from None


def _require_safetensors(path: Path, what: str) -> None:
    if not any(path.glob("*.safetensors")):
        raise VlmpruneError(
            f"{what} at {path} has no .safetensors weights",
            "vlmprune loads only safetensors (no pickled .bin); convert the checkpoint or pick one that ships them",
        )


def load_clip(name_or_path: str, *, trust_remote_code: bool = False) -> ClipText:
    """GridPrune's CLIP text tower and projections (``openai/clip-vit-large-patch14-336`` layout)."""
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_path(name_or_path, "CLIP model")
    _require_safetensors(path, "CLIP model")
    model = CLIPModel.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code).eval()
    model.vision_model = None  # the VLM's own vision tower is used; free CLIP's copy
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return ClipText(
        model=model,
        tokenizer=tokenizer,
        path=path,
        projection_dim=int(model.config.projection_dim),
        max_length=int(model.config.text_config.max_position_embeddings),
    )


def load_model(
    name_or_path: str = "tiny-llava",
    *,
    clip: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "eager",
) -> VLMAdapter:
    """Load a VLM and return its adapter (``.model`` is the ``transformers`` model, in fp32 eval mode).

    ``clip`` names GridPrune's CLIP model; a preset brings its own in ``clip/``. ``trust_remote_code`` is passed to
    transformers only when the user asks for it.
    """
    path = resolve_path(name_or_path)
    model_type = _model_type(path)
    if model_type in _PLANNED:
        raise VlmpruneError(
            f"{_PLANNED[model_type]} ({model_type}) is not supported by this version of vlmprune yet",
            f"supported architectures: {', '.join(_ARCHES.values())}",
        )
    if model_type not in _ARCHES:
        raise VlmpruneError(
            f"unknown model type {model_type!r} in {path / 'config.json'}",
            f"supported architectures: {', '.join(f'{v} ({k})' for k, v in _ARCHES.items())}",
        )
    _require_safetensors(path, "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network while loading
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        path,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    ).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    clip_source = clip
    if clip_source is None and (path / "clip" / "config.json").exists():
        clip_source = str(path / "clip")
    clip_text = load_clip(clip_source, trust_remote_code=trust_remote_code) if clip_source else None
    from .llava import LlavaAdapter

    return LlavaAdapter(model, processor, path, source=name_or_path, clip=clip_text)
