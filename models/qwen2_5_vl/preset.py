"""Writing a Qwen2.5-VL preset: Qwen2.5-VL's real geometry (patch 14, temporal patch 2, 2x2 merge, window 112,
full-attention blocks every fourth block with the last block full as in Qwen2.5-VL-7B, M-RoPE sections in the 7B's
proportions) at the widths of a ``PresetSpec``, random weights, the offline Qwen tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL-7B's [16, 24, 24] (of 64 rotary pairs, head_dim 128) scaled to ``head_dim``."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def full_attention_blocks(depth: int) -> list[int]:
    """Every fourth block ending with the last (7B: depth 32 -> 7, 15, 23, 31); two of four in a 4-block tower."""
    step = 4 if depth >= 8 else 2
    return list(range(depth - 1, -1, -step))[::-1]


def write_qwen_preset(spec, folder: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmprune.models.presets import init_weights
    from vlmprune.models.qwen2_5_vl.adapter import qwen_processor, save_processor

    processor, ids, vocab = qwen_processor(spec.max_context)
    head_dim = spec.text_hidden // spec.text_heads
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=spec.spatial_merge,
        window_size=112,
        fullatt_block_indexes=full_attention_blocks(spec.vision_layers),
        out_hidden_size=spec.text_hidden,
        hidden_act="silu",
        in_channels=3,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_context,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section(head_dim), "rope_theta": 1000000.0},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rms_norm_eps=1e-6,
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    init_weights(model, spec.seed)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    save_processor(processor, folder)
    write_auxiliary_clip(spec, folder / "clip", vocab_seed=spec.seed + 1)
    from vlmprune.models.presets import PRESET_VERSION

    (folder / "VLMPRUNE_PRESET").write_text(f"{spec.name} v{PRESET_VERSION} seed {spec.seed}\n")


def write_auxiliary_clip(spec, folder: Path, vocab_seed: int) -> None:
    """GridPrune's auxiliary CLIP for the preset: a whole tiny CLIP (vision tower, text tower, projections) at 336 px
    (24 x 24 patches, resampled onto the merged grid), with the tiny presets' CLIP tokenizer and preprocessing."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    from transformers import PreTrainedTokenizerFast

    from vlmprune.models.presets import init_weights
    from vlmprune.models.tiny_tokenizer import build_tokenizer

    raw = build_tokenizer()
    ids = {t: raw.token_to_id(t) for t in ("<s>", "</s>", "<pad>")}
    text = CLIPTextConfig(vocab_size=raw.get_vocab_size(), hidden_size=spec.clip_text_hidden,
                          intermediate_size=spec.clip_text_hidden * 4, num_hidden_layers=spec.clip_text_layers,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=ids["<s>"],
                          eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], projection_dim=spec.clip_projection)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=spec.clip_projection,
                              hidden_act="quick_gelu")
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=spec.clip_projection)).eval()
    init_weights(clip, vocab_seed)
    clip.save_pretrained(folder, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=77)
    # CLIP pools at the end-of-text token: end every prompt with </s>.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
