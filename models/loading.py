"""Resolve what the user named (a preset, a local folder, a Hugging Face id in the local cache) and load it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmprune.errors import VlmpruneError

from .adapter import ClipText, VLMAdapter
from .presets import PRESETS, ensure_preset

# model_type in config.json -> adapter: the family registry (models/registry.py), one adapter file per family.
from .registry import Family, family_for


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
    presets = ", ".join(PRESETS)
    if not _looks_like_hub_id(name_or_path):  # a mistyped local path gets no download advice
        raise VlmpruneError(f"{what} folder {path} does not exist (nor is {name_or_path!r} a built-in preset: {presets})",
                            "check the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        pass
    raise VlmpruneError(
        f"{what} {name_or_path!r} not found: not a built-in preset ({presets}), not a local folder, "
        f"and not in the Hugging Face cache at {_hf_cache_dir()}",
        f"download it where there is network with `hf download {name_or_path}` (huggingface_hub's CLI), "
        "or pass a local folder",
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` as the hub spells ids, and not a path into an existing local folder (``exports/x``)."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or Path(name.split("/")[0]).is_dir():
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except ImportError:  # pragma: no cover - huggingface_hub comes with the export extra
        return True
    except Exception:
        return False
    return True


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmpruneError(f"cannot read {path / 'config.json'}: {exc}", "check the model folder") from None
    if not isinstance(config, dict):
        raise VlmpruneError(f"{path / 'config.json'} is not a JSON object", "check the model folder")
    return config


def _model_type(path: Path) -> str:
    return str(_read_config(path).get("model_type", ""))


def model_family(name_or_path: str | Path) -> Family:
    """The registered family of a model (from its config.json only: nothing loads), or one line saying it is not
    supported."""
    path = resolve_path(str(name_or_path))
    return family_for(_model_type(path), str(path / "config.json"))


def _require_safetensors(path: Path, what: str) -> None:
    if not any(path.glob("*.safetensors")):
        raise VlmpruneError(
            f"{what} at {path} has no .safetensors weights",
            "vlmprune loads only safetensors (no pickled .bin); convert the checkpoint or pick one that ships them",
        )


def checkpoint_dtype(path: Path) -> str:
    """The floating-point dtype the checkpoint's tensors are stored in (``F16``, ``BF16``, ``F32``), read from the
    safetensors headers only (a few KB), so the export default can follow the checkpoint without loading it."""
    import struct

    counts: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise VlmpruneError(f"{file} is not a readable safetensors file ({exc})",
                                "re-download the checkpoint; the file may be truncated") from None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict) and info.get("dtype") in ("F16", "BF16", "F32"):
                begin, end = info.get("data_offsets", (0, 0))
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + int(end) - int(begin)
    return max(counts, key=counts.get) if counts else "F32"


def _strict_loading(info: dict, what: str, path: Path) -> None:
    """A tensor the checkpoint lacks would be initialised at random by transformers and validation would compare
    against that same random model, so anything missing, unexpected or of the wrong shape is an error."""
    for key, label in (("missing_keys", "lacks"), ("unexpected_keys", "has unexpected"), ("mismatched_keys", "has wrongly shaped")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or ())
        if names:
            first = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise VlmpruneError(f"{what} at {path} {label} {len(names)} tensor(s): {first}",
                                "point at a complete checkpoint of that architecture (all shards present)")


def load_clip(name_or_path: str, *, trust_remote_code: bool = False, keep_vision: bool = False) -> ClipText:
    """GridPrune's CLIP text tower and projections (``openai/clip-vit-large-patch14-336`` layout)."""
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_path(name_or_path, "CLIP model")
    config = _read_config(path)
    if config.get("model_type") != "clip" or not config.get("text_config"):
        raise VlmpruneError(
            f"--clip {name_or_path} is not a CLIP model with a text tower (model_type {config.get('model_type')!r})",
            "pass a CLIP checkpoint such as openai/clip-vit-large-patch14-336",
        )
    _require_safetensors(path, "CLIP model")
    model, info = CLIPModel.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                            output_loading_info=True)
    _strict_loading(info, "CLIP model", path)
    model = model.eval()
    if not keep_vision:  # the VLM's own vision tower is used; free CLIP's copy
        model.vision_model = None
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
    decoder_dtype: str = "float32",
    method: str | None = None,
    needs=None,
) -> VLMAdapter:
    """Load a VLM and return its adapter (``.model`` is the ``transformers`` model in eval mode).

    The vision tower and projector are fp32 (vision precision is chosen at export). The language model is loaded in
    ``decoder_dtype``: ``float16`` keeps a published fp16 checkpoint as it is (safetensors are memory-mapped, no fp32
    copy of the decoder is ever made), ``float32`` upcasts it.

    ``clip`` names GridPrune's CLIP model; a preset brings its own in ``clip/``. ``trust_remote_code`` is passed to
    transformers only when the user asks for it. ``needs`` (a method's ``MethodSpec.needs``) is checked against the
    family's capabilities before anything loads.
    """
    path = resolve_path(name_or_path)
    family = model_family(path)
    if needs is not None:
        family.check_needs(method or "this method", needs)
    _require_safetensors(path, "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network while loading
    import torch
    import transformers
    from transformers import AutoProcessor

    model_class = getattr(transformers, family.transformers_class)

    if decoder_dtype not in ("float32", "float16"):
        raise ValueError(f"decoder_dtype {decoder_dtype!r}")
    try:
        model, info = model_class.from_pretrained(
            path,
            dtype=getattr(torch, decoder_dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # truncated shards, a bad index, shape errors
        raise VlmpruneError(f"cannot load the checkpoint at {path}: {str(exc).splitlines()[0][:200]}",
                            "check that every shard is complete (re-download it)") from None
    _strict_loading(info, "model", path)
    model = model.eval()
    for part in family.vision_modules:
        module = model.get_submodule(part)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()  # the vision side is small; the export decides its precision
    try:
        if family.processor_loader:
            import importlib

            module, _, fn = family.processor_loader.partition(":")
            processor = getattr(importlib.import_module(module), fn)(path, trust_remote_code=trust_remote_code)
        else:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise VlmpruneError(f"cannot load the processor files at {path}: {str(exc).splitlines()[0][:200]}",
                            "the folder needs tokenizer and preprocessor files as published with the model") from None
    clip_source = clip
    if clip_source is None and (path / "clip" / "config.json").exists():
        clip_source = str(path / "clip")
    # a family without a CLIP joint space (Qwen2.5-VL) runs the auxiliary CLIP's own vision tower on the image
    clip_text = load_clip(clip_source, trust_remote_code=trust_remote_code,
                          keep_vision=not family.capabilities.clip_joint_space) if clip_source else None
    adapter = family.adapter_class()(model, processor, path, source=name_or_path, clip=clip_text)
    adapter.family = family
    return adapter
