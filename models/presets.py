"""Built-in presets: real architecture and geometry, small widths, random weights from a fixed seed.

A preset is written once as a Hugging Face folder (config, safetensors, tokenizer, processor; GridPrune's CLIP
text tower in ``clip/``) under the vlmprune cache and loaded back through the same code as a real checkpoint.
"""

from __future__ import annotations

import os
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
    family: str = "llava"  # model_type: "llava" (LLaVA-1.5) or "llava_next" (anyres)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # llava_next: (height, width) canvases
    spatial_merge: int = 1  # qwen2_5_vl: patches merged per side into one LLM token (2x2 in Qwen2.5-VL)


# llava-hf/llava-v1.6-*-hf's image_grid_pinpoints
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


PRESETS: dict[str, PresetSpec] = {
    "tiny-llava": PresetSpec(
        name="tiny-llava",
        description="LLaVA-1.5 geometry (336 px, patch 14, 576 patches + CLS, penultimate-layer features), tiny widths",
        vision_hidden=64,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=256,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        max_context=1024,
    ),
    # Widths chosen so that, as in LLaVA-1.5-7B (ViT-L/336 + 7B decoder), the vision encoder is ~5 % of the unpruned
    # time to first token on ONNX Runtime CPU; small enough for a full prune-bench sweep in minutes on 2 cores.
    "bench-llava": PresetSpec(
        name="bench-llava",
        description="LLaVA-1.5 geometry with vision/decoder cost in LLaVA-1.5-7B proportions, for prune-bench",
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=512,
        text_hidden=512,
        text_layers=7,
        text_heads=8,
        text_kv_heads=8,
        text_intermediate=1408,
        max_context=2048,
        seed=1,
    ),
    "tiny-llava-next": PresetSpec(
        name="tiny-llava-next",
        description="LLaVA-NeXT geometry (336 px base view + crops of the llava-v1.6 pinpoints, image_newline, "
                    "up to 2,880 patches), tiny widths",
        vision_hidden=64,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=256,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        max_context=4096,  # 2,880 patches + 48 newlines + the prompt
        seed=2,
        family="llava_next",
        grid_pinpoints=LLAVA_V16_PINPOINTS,
    ),
    # bench-llava's widths on the NeXT geometry: as in LLaVA-NeXT-7B (ViT-L/336 on 5 views + a 7B decoder on ~2,900
    # image tokens) the vision encoder stays a few percent of the unpruned time to first token.
    "bench-llava-next": PresetSpec(
        name="bench-llava-next",
        description="LLaVA-NeXT geometry with vision/decoder cost in LLaVA-NeXT-7B proportions, for prune-bench",
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=512,
        text_hidden=512,
        text_layers=7,
        text_heads=8,
        text_kv_heads=8,
        text_intermediate=1408,
        max_context=4096,
        seed=3,
        family="llava_next",
        grid_pinpoints=LLAVA_V16_PINPOINTS,
    ),
    "tiny-qwen2.5-vl": PresetSpec(
        name="tiny-qwen2.5-vl",
        description="Qwen2.5-VL geometry (patch 14, temporal patch 2, 2x2 merger, window 112, full-attention blocks, "
                    "M-RoPE), tiny widths; 448x448 gives 256 merged tokens",
        vision_hidden=64,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=128,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        max_context=2048,
        image_size=448,
        seed=4,
        family="qwen2_5_vl",
        spatial_merge=2,
    ),
    # As in Qwen2.5-VL-7B at 448 x 448 (a 32-block, 1280-wide window-attention ViT on 1,024 patches before a 7B
    # decoder on ~300 tokens), the vision encoder is about a fifth of the unpruned time to first token.
    "bench-qwen2.5-vl": PresetSpec(
        name="bench-qwen2.5-vl",
        description="Qwen2.5-VL geometry with vision/decoder cost in Qwen2.5-VL-7B proportions, for prune-bench",
        vision_hidden=128,
        vision_layers=8,
        vision_heads=4,
        vision_intermediate=512,
        text_hidden=512,
        text_layers=7,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate=1408,
        max_context=2048,
        image_size=448,
        seed=5,
        family="qwen2_5_vl",
        spatial_merge=2,
    ),
}


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
        if spec.family == "qwen2_5_vl":
            from .qwen_preset import write_qwen_preset

            write_qwen_preset(spec, tmp)
        else:
            write_llava_preset(spec, tmp)
        try:
            rename_noreplace(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        remove_temp(tmp)
    return target


def _init_weights(model, seed: int) -> None:
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


def llava_processor(image_size: int, patch_size: int, max_context: int):
    """The offline tokenizer and a LLaVA-1.5 processor (CLIP preprocessing, chat template) for made checkpoints;
    returns ``(processor, special token ids, vocabulary size)``."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from .tiny_tokenizer import LLAVA_CHAT_TEMPLATE, build_tokenizer

    raw = build_tokenizer()
    vocab = raw.get_vocab_size()
    ids = {t: raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=max_context,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return processor, ids, vocab


def write_llava_preset(spec: PresetSpec, folder: Path) -> None:
    import torch
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    from .tiny_tokenizer import build_tokenizer

    if spec.family == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        from .llava_next import next_processor

        processor, ids, vocab = next_processor(spec.image_size, spec.patch_size, spec.max_context,
                                               spec.grid_pinpoints)
        config_class, model_class = LlavaNextConfig, LlavaNextForConditionalGeneration
        extra = {"image_grid_pinpoints": [list(p) for p in spec.grid_pinpoints]}
    else:
        processor, ids, vocab = llava_processor(spec.image_size, spec.patch_size, spec.max_context)
        config_class, model_class, extra = LlavaConfig, LlavaForConditionalGeneration, {}
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.clip_projection,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_context,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra,
    )
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    _init_weights(model, spec.seed)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.bos_token_id = ids["<s>"]
    model.save_pretrained(folder, safe_serialization=True)

    processor.save_pretrained(folder)

    # GridPrune's CLIP: a tiny text tower and projections over the *same* vision tower weights.
    clip_config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=spec.clip_text_hidden,
            intermediate_size=spec.clip_text_hidden * 4,
            num_hidden_layers=spec.clip_text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            projection_dim=spec.clip_projection,
        ).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=spec.clip_projection,
    )
    clip = CLIPModel(clip_config).eval()
    _init_weights(clip, spec.seed + 1)
    tower = model.model.vision_tower
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    clip_dir = folder / "clip"
    clip.save_pretrained(clip_dir, safe_serialization=True)
    clip_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=77,
    )
    # CLIP pools at the end-of-text token: end every prompt with </s>.
    from tokenizers import processors

    clip_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])]
    )
    clip_tok.save_pretrained(clip_dir)
    (folder / "VLMPRUNE_PRESET").write_text(f"{spec.name} v{PRESET_VERSION} seed {spec.seed}\n")
