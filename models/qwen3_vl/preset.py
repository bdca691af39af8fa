"""Writing a Qwen3-VL preset: Qwen3-VL's real geometry (patch 16, temporal patch 2, 2x2 merge, the 48 x 48 learned
position table, full attention in every block, DeepStack at three blocks, interleaved M-RoPE sections in the 4B's
proportions, tied embeddings as in the 2B/4B) at the widths of a ``PresetSpec``, random weights, the offline Qwen
tokenizer with Qwen3-VL's chat template, and GridPrune's auxiliary CLIP (the Qwen2.5-VL family's writer)."""

from __future__ import annotations

from pathlib import Path


def mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL-4B's [24, 20, 20] (of 64 rotary pairs, head_dim 128) scaled to ``head_dim``."""
    half = head_dim // 2
    h = half * 20 // 64
    return [half - 2 * h, h, h]


def deepstack_blocks(depth: int) -> list[int]:
    """Three blocks at a quarter, half and three quarters of the tower (4B: depth 24 -> 5, 11, 17); the first
    three blocks of a tower too shallow for that."""
    if depth < 8:
        return [0, 1, 2]
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]


def write_qwen3_preset(spec, folder: Path) -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vlmprune.models.presets import PRESET_VERSION, init_weights
    from vlmprune.models.qwen2_5_vl.adapter import save_processor
    from vlmprune.models.qwen2_5_vl.preset import write_auxiliary_clip
    from vlmprune.models.qwen3_vl.adapter import qwen3_processor

    processor, ids, vocab = qwen3_processor(spec.max_context)
    head_dim = spec.text_hidden // spec.text_heads
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=spec.spatial_merge,
        num_position_embeddings=2304,
        deepstack_visual_indexes=deepstack_blocks(spec.vision_layers),
        out_hidden_size=spec.text_hidden,
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=spec.max_context,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section(head_dim), "mrope_interleaved": True,
                         "rope_theta": 5000000.0},
        pad_token_id=ids["<|endoftext|>"],
        rms_norm_eps=1e-6,
    )
    config = Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    init_weights(model, spec.seed)
    model.tie_weights()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    save_processor(processor, folder)
    write_auxiliary_clip(spec, folder / "clip", vocab_seed=spec.seed + 1)
    (folder / "VLMPRUNE_PRESET").write_text(f"{spec.name} v{PRESET_VERSION} seed {spec.seed}\n")


def ttft_macs(vision: dict, text: dict, image_size: tuple[int, int], text_tokens: int = 20) -> tuple[float, float]:
    """``(vision, decoder)`` multiply-accumulates of an unpruned prefill at ``image_size``, from config fields (the
    bench preset is sized so its vision share matches Qwen3-VL-4B's by this count): the ViT's blocks and attention,
    the merger and the DeepStack mergers; the decoder's projections, MLP and causal attention over the prompt."""
    p, m = vision["patch_size"], vision["spatial_merge_size"]
    n = (image_size[0] // p) * (image_size[1] // p)
    d, inter, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    merged, wide = n // m**2, d * m**2
    mergers = (1 + len(vision["deepstack_visual_indexes"])) * merged * (wide * wide + wide * vision["out_hidden_size"])
    v = depth * (n * (4 * d * d + 2 * d * inter) + 2 * n * n * d) + mergers
    h, heads, kv, hd = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    s = merged + text_tokens
    per_token = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * text["intermediate_size"]
    t = text["num_hidden_layers"] * (s * per_token + s * s * heads * hd)  # QK^T and PV over the causal half, twice
    return float(v), float(t)
