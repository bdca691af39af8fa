"""Built-in presets: real architecture and geometry, small widths, random weights from a fixed seed.

A preset is written once as a Hugging Face folder (config, safetensors, tokenizer, processor; GridPrune's CLIP
text tower in ``clip/``) under the vlmprune cache and loaded back through the same code as a real checkpoint.
Each family declares its presets and their writer (``models/<family>/``); this module is the table over all of
them and the cache they are written to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PRESET_VERSION = 1


@dataclass(frozen=True)
class PresetSpec:
    name: str
    description: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    max_context: int
    clip_text_hidden: int = 64
    clip_text_layers: int = 2
    clip_projection: int = 32
    image_size: int = 336
    patch_size: int = 14
    seed: int = 0
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # multi-view families: the (height, width) canvases
    spatial_merge: int = 1  # patches merged per side into one LLM token (2 for a 2x2 merger)


class _PresetTable(Mapping):
    """Every family's presets by name, read from the registry on first use (the families import this module)."""

    def _table(self) -> dict:
        from .registry import all_presets

        return all_presets()

    def __getitem__(self, name):
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())


PRESETS: Mapping[str, PresetSpec] = _PresetTable()


def cache_root() -> Path:
    return Path(os.environ.get("VLMPRUNE_CACHE") or Path.home() / ".cache" / "vlmprune")


def preset_path(name: str) -> Path:
    return cache_root() / "presets" / f"{name}-v{PRESET_VERSION}"


def ensure_preset(name: str) -> Path:
    """The preset's folder, written on first use (atomically: built in a temporary folder, then renamed)."""
    spec = PRESETS[name]
    from vlmprune.atomic import clean_leftovers, make_temp_dir, remove_temp, rename_noreplace

    target = preset_path(name)
    clean_leftovers(target.parent)  # temporary folders of preset writes that were killed (a scan of one folder)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)  # marked with its owner, so a later run can remove a leftover
    try:
        from .registry import family_of_preset, load

        load(family_of_preset(name).preset_writer)(spec, tmp)
        try:
            rename_noreplace(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        remove_temp(tmp)
    return target


def init_weights(model, seed: int) -> None:
    """Weights with unit-scale activations (fan-in scaled normals), so attention maps and pruning scores are spread
    out rather than the near-uniform maps that a 0.02-std init gives, which would make selections tie-prone."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) * fan_in**-0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(("class_embedding", "image_newline")):
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
