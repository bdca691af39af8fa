"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, model_type ``qwen3_vl``): a full-attention ViT on 16 x 16 patches
(temporal patch 2) with learned position embeddings, a 2 x 2 merger to the LLM width, DeepStack mergers on the
outputs of the blocks ``deepstack_visual_indexes`` (their features are added to the hidden states of the first
decoder layers at the visual positions), and a Qwen3 decoder with interleaved M-RoPE (``position_ids [3, B, S]``).

Built on the Qwen2.5-VL adapter: the static image size, the processor checks, the auxiliary CLIP of GridPrune and
the language side are the same; the encoder (``vision.Qwen3VisionStatic``), the DeepStack features and the
processor class are this family's. Buckets are static image sizes, each side a multiple of 32 (patch x merge).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from vlmprune.errors import VlmpruneError
from vlmprune.models.qwen2_5_vl.adapter import QwenAdapter

DEFAULT_IMAGE_SIZE = (448, 448)


class Qwen3Adapter(QwenAdapter):
    arch = "qwen3_vl"

    def __init__(self, model, processor, path: Path, source: str, clip=None,
                 image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE):
        vcfg = model.config.vision_config
        if not list(getattr(vcfg, "deepstack_visual_indexes", None) or []):
            raise VlmpruneError("the vision config has no deepstack_visual_indexes",
                                "use a Qwen3-VL checkpoint's config.json")
        super().__init__(model, processor, path, source, clip, image_size)
        rope = getattr(model.config.text_config, "rope_parameters", None) or {}
        self.mrope_interleaved = bool(rope.get("mrope_interleaved", True))
        self.deepstack_levels = len(vcfg.deepstack_visual_indexes)

    def static(self):
        """The encoder at the current image size (``Qwen3VisionStatic``), built once per size."""
        from vlmprune.models.qwen3_vl.vision import Qwen3VisionStatic

        if self.patch_grid not in self._static:
            self._static[self.patch_grid] = Qwen3VisionStatic(self.visual, self.patch_grid)
        return self._static[self.patch_grid]

    def reference_deepstack(self, pixel_values: Tensor) -> Tensor:
        """[levels, M, D]: transformers' own DeepStack features of one image."""
        import torch

        out = self.model.model.get_image_features(pixel_values=pixel_values,
                                                  image_grid_thw=torch.tensor([self.grid_thw]))
        return torch.stack([level[0] for level in out.deepstack_features])

    def _need_clip(self):
        if self.clip is None or getattr(self.clip.model, "vision_model", None) is None:
            raise VlmpruneError("GridPrune on Qwen3-VL needs an auxiliary CLIP (vision and text towers), and none "
                                "was loaded", "pass --clip PATH|HF-ID (openai/clip-vit-large-patch14-336 layout)")
        return self.clip

    def describe(self):
        d = super(QwenAdapter, self).describe()
        vcfg = self.model.config.vision_config
        d["qwen"] = {
            "patch_grid": list(self.patch_grid),
            "merge_size": int(vcfg.spatial_merge_size),
            "deepstack_visual_indexes": [int(i) for i in vcfg.deepstack_visual_indexes],
            "num_position_embeddings": int(vcfg.num_position_embeddings),
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": self.mrope_interleaved,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }
        return d


# Qwen3-VL-Instruct's chat template (Qwen/Qwen3-VL-4B-Instruct chat_template.json) for messages of text and images:
# no default system turn (unlike Qwen2.5-VL), the image as <|vision_start|><|image_pad|><|vision_end|>. The
# published template's tool-calling and reasoning branches are left out: the runtime renders user turns only.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen3_processor(max_context: int):
    """The offline tokenizer and a Qwen3-VL processor (Qwen2-VL image processor at patch 16 with Qwen3-VL's
    constants, the Qwen3-VL chat template) for made checkpoints; ``(processor, special token ids, vocabulary)``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmprune.models.qwen2_5_vl.tokenizer import SPECIAL_TOKENS, build_qwen_tokenizer

    raw = build_qwen_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        model_max_length=max_context,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    # Qwen3-VL's preprocessor_config.json: patch 16, merge 2, temporal 2, mean = std = 0.5, pixels 64K..16M
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=QWEN3_CHAT_TEMPLATE)
    return processor, ids, raw.get_vocab_size()


def _processor_class():
    """``Qwen3VLProcessor`` without a video processor: transformers' video processors need torchvision, which
    vlmprune does not install (images only), as for Qwen2.5-VL (``models/qwen2_5_vl/adapter._processor_class``)."""
    from transformers import Qwen3VLProcessor

    class Qwen3ImageProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen3ImageProcessor


def load_processor(path: Path, trust_remote_code: bool = False):
    """The family's processor loader: the checkpoint's image processor (Pillow backend), tokenizer and chat
    template, as ``Qwen3VLProcessor`` builds them, without the video side."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(path)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template = getattr(tokenizer, "chat_template", None)
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if file.is_file():
            text = file.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                              chat_template=template)
