"""LLaVA-1.5 presets: the offline tokenizer and processor, and a checkpoint folder at a ``PresetSpec``'s widths with
random weights (plus GridPrune's CLIP text tower over the same vision tower in ``clip/``)."""

from __future__ import annotations

from pathlib import Path

from vlmprune.models.presets import PRESET_VERSION, PresetSpec, init_weights

# LLaVA-1.5's chat template (llava-hf), without the transformers-only {% generation %} tags so that plain jinja2
# at the edge renders it too.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

def llava_processor(image_size: int, patch_size: int, max_context: int):
    """The offline tokenizer and a LLaVA-1.5 processor (CLIP preprocessing, chat template) for made checkpoints;
    returns ``(processor, special token ids, vocabulary size)``."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from vlmprune.models.tiny_tokenizer import build_tokenizer

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


def write_preset(spec: PresetSpec, folder: Path, made=None) -> None:
    """A LLaVA-1.5 checkpoint folder for ``spec`` (``made``: another LLaVA-style family's ``(processor, ids, vocab,
    config class, model class, extra config)``, e.g. LLaVA-NeXT's)."""
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

    from vlmprune.models.tiny_tokenizer import build_tokenizer

    if made is not None:
        processor, ids, vocab, config_class, model_class, extra = made
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
    init_weights(model, spec.seed)
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
    init_weights(clip, spec.seed + 1)
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
