"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, model_type ``qwen2_5_vl``): a window-attention ViT on 14 x 14
patches (temporal patch 2: a still image is its frame twice) with a few full-attention blocks, a 2 x 2 patch merger
to the LLM width, and a Qwen2 decoder with M-RoPE (``position_ids [3, B, S]``: temporal, height, width).

No CLS token and no CLIP joint space. Static image-size buckets: each side a multiple of 28 (patch x merge); a
448 x 448 image gives 32 x 32 patches and 16 x 16 = 256 merged tokens. Scoring reads the last full-attention block
(``models/qwen_vision.py``); tokens are indexed in raster order of the merged grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vlmprune.errors import VlmpruneError
from vlmprune.runtime.preprocess import resample_name
from vlmprune.models.qwen2_5_vl.preprocess import parse_image_size  # noqa: F401  (the adapter's sizes)

from vlmprune.models.adapter import ClipText, Preprocessing, TextSpec, ViewSpec, VisionSpec, VLMAdapter

DEFAULT_IMAGE_SIZE = (448, 448)


@dataclass(frozen=True)
class QwenPreprocessing(Preprocessing):
    """The Qwen2-VL image processor at a static bucket: resize to ``crop_size`` (no crop: the bucket is the resized
    size), rescale, normalise, patchify into the flattened patch sequence."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2


class QwenAdapter(VLMAdapter):
    arch = "qwen2_5_vl"

    def __init__(self, model, processor, path: Path, source: str, clip: ClipText | None = None,
                 image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.path = Path(path)
        self.source = source
        self.clip = clip
        cfg = model.config
        vcfg = cfg.vision_config
        ip = processor.image_processor
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            theirs = getattr(vcfg, "spatial_merge_size" if name == "merge_size" else name)
            if int(getattr(ip, name)) != int(theirs):
                raise VlmpruneError(f"the image processor's {name}={getattr(ip, name)} differs from the vision "
                                    f"config's {theirs}", "use the processor files published with the checkpoint")
        self.factor = int(vcfg.patch_size) * int(vcfg.spatial_merge_size)
        tcfg = cfg.text_config
        heads = tcfg.num_attention_heads
        rope = getattr(tcfg, "rope_parameters", None) or {}
        self.mrope_section = tuple(int(x) for x in rope.get("mrope_section", ()))
        if len(self.mrope_section) != 3:
            raise VlmpruneError("the text config has no 3-part rope_parameters.mrope_section",
                                "use a Qwen2.5-VL checkpoint's config.json")
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.text = TextSpec(
            hidden_size=tcfg.hidden_size,
            vocab_size=tcfg.vocab_size,
            num_layers=tcfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads,
            max_context=tcfg.max_position_embeddings,
            bos_token_id=None,  # Qwen prepends nothing
            eos_token_id=int(eos) if eos is not None else self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            image_token=processor.image_token,
            image_token_id=int(cfg.image_token_id),
            chat_template=getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None),
        )
        self.vision_start_token_id = int(cfg.vision_start_token_id)
        self.vision_end_token_id = int(cfg.vision_end_token_id)
        self._static = {}
        self.set_image_size(image_size)

    # --- the static size ---------------------------------------------------------------------------------------
    def set_image_size(self, image_size: tuple[int, int]) -> None:
        """Fix the bucket's image size (h, w): the vision spec, the preprocessing constants and the graph pieces."""
        h, w = (int(x) for x in image_size)
        if h % self.factor or w % self.factor or min(h, w) < self.factor:
            raise VlmpruneError(f"image size {h}x{w} is not a multiple of {self.factor} on each side",
                                f"give --image-size as HxW with sides multiples of {self.factor}, e.g. 448x448")
        vcfg = self.model.config.vision_config
        ip = self.processor.image_processor
        merge = int(vcfg.spatial_merge_size)
        grid = (h // vcfg.patch_size, w // vcfg.patch_size)
        self.image_size = (h, w)
        self.patch_grid = grid
        self.vision = VisionSpec(
            patch_size=int(vcfg.patch_size),
            hidden_size=int(vcfg.hidden_size),
            num_heads=int(vcfg.num_heads),
            num_layers=int(vcfg.depth),
            feature_layer=-1,  # the merger reads the last block's output
            layers_run=int(vcfg.depth),
            views=(ViewSpec("image", (h, w), (grid[0] // merge, grid[1] // merge), False),),
        )
        self.preprocessing = QwenPreprocessing(
            resize_shortest_edge=min(h, w),
            crop_size=(h, w),
            resample=resample_name(getattr(ip, "resample", 3)),
            do_resize=bool(getattr(ip, "do_resize", True)),
            do_center_crop=False,
            do_rescale=bool(getattr(ip, "do_rescale", True)),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            do_normalize=bool(getattr(ip, "do_normalize", True)),
            mean=tuple(float(x) for x in ip.image_mean),
            std=tuple(float(x) for x in ip.image_std),
            do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
            kind="qwen2_vl",
            patch_size=int(vcfg.patch_size),
            temporal_patch_size=int(vcfg.temporal_patch_size),
            merge_size=merge,
        )

    @property
    def visual(self):
        return self.model.model.visual

    def static(self):
        """The encoder at the current image size (``QwenVisionStatic``), built once per size."""
        from vlmprune.models.qwen2_5_vl.vision import QwenVisionStatic

        if self.patch_grid not in self._static:
            self._static[self.patch_grid] = QwenVisionStatic(self.visual, self.patch_grid)
        return self._static[self.patch_grid]

    @property
    def grid_thw(self) -> list[int]:
        return [1, *self.patch_grid]

    # --- vision (pixel_values are the processor's flattened patches [N, C*T*P*P]) ----------------------------
    def hidden_before_scoring(self, pixel_values: Tensor) -> Tensor:
        """[N, C]: the input of the last full-attention block, window order."""
        st = self.static()
        x = st.embed(pixel_values)
        for i in range(st.last_full):
            x = st.block(i, x)
        return x

    def scoring_layer(self, hidden: Tensor) -> Tensor:
        """[N, C]: the last block's output (the last full-attention block and the blocks after it), window order."""
        st = self.static()
        for i in range(st.last_full, len(self.visual.blocks)):
            hidden = st.block(i, hidden)
        return hidden

    def scoring_qk(self, hidden: Tensor):
        return self.static().scoring_qk(hidden)

    def select_patches(self, features: Tensor) -> Tensor:
        """Window order -> processor order (merge groups in raster order, four patches each)."""
        return features[self.static().inverse]

    def project(self, patches: Tensor) -> Tensor:
        """The 2x2 merger: [N, C] in processor order -> [N/4, D] in raster order of the merged grid."""
        return self.static().merge_tokens(patches)

    def reference_image_features(self, pixel_values: Tensor) -> Tensor:
        import torch

        out = self.model.model.get_image_features(pixel_values=pixel_values,
                                                  image_grid_thw=torch.tensor([self.grid_thw]))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return feats[0] if isinstance(feats, (tuple, list)) else feats

    # --- GridPrune: the auxiliary CLIP ----------------------------------------------------------------------------
    def _need_clip(self):
        if self.clip is None or getattr(self.clip.model, "vision_model", None) is None:
            raise VlmpruneError("GridPrune on Qwen2.5-VL needs an auxiliary CLIP (vision and text towers), and none "
                                "was loaded", "pass --clip PATH|HF-ID (openai/clip-vit-large-patch14-336 layout)")
        return self.clip

    @property
    def clip_image_size(self) -> int:
        return int(self._need_clip().model.config.vision_config.image_size)

    @property
    def clip_grid(self) -> tuple[int, int]:
        vcfg = self._need_clip().model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return side, side

    def clip_constants(self) -> dict:
        """The runtime's auxiliary-CLIP preprocessing (``runtime.qwen_preprocess.clip_view``), from the CLIP folder's
        image processor when it has one, else OpenAI CLIP's constants."""
        constants = {"size": self.clip_image_size, "resample": "bicubic", "rescale_factor": 1 / 255,
                     "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
        if (Path(self.clip.path) / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(self.clip.path)
            resample = getattr(ip, "resample", 3)
            constants.update(resample=resample_name(resample), rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
                             mean=[float(x) for x in ip.image_mean], std=[float(x) for x in ip.image_std])
        return constants

    def clip_relevance(self, clip_pixels: Tensor, text_embeds: Tensor) -> Tensor:
        """[B, hc, wc]: the cosine between each auxiliary-CLIP patch (penultimate layer, ``post_layernorm``, visual
        projection, as GridPrune's relevance on LLaVA) and the L2-normalised prompt embedding."""
        from vlmprune.prune.select import l2_normalize

        from vlmprune.models.llava.adapter import _layer_out

        clip = self._need_clip().model
        tower = clip.vision_model
        h = tower.pre_layrnorm(tower.embeddings(clip_pixels.to(tower.embeddings.patch_embedding.weight.dtype)))
        for layer in tower.encoder.layers[:-1]:
            h = _layer_out(layer(h, None))
        v = l2_normalize(clip.visual_projection(tower.post_layernorm(h[:, 1:])).float())
        r = torch.matmul(v, l2_normalize(text_embeds.float()).unsqueeze(-1)).squeeze(-1)
        return r.reshape(r.shape[0], *self.clip_grid)

    def text_embeds(self, input_ids: Tensor) -> Tensor:
        clip = self._need_clip()
        out = clip.model.get_text_features(input_ids=input_ids)
        feats = out if isinstance(out, Tensor) else out.pooler_output
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # --- language side ------------------------------------------------------------------------------------------
    def embedding_table(self) -> Tensor:
        return self.model.get_input_embeddings().weight

    def language_model(self):
        return self.model.model.language_model

    def lm_head(self):
        return self.model.lm_head

    def describe(self):
        d = super().describe()
        vcfg = self.model.config.vision_config
        d["qwen"] = {
            "patch_grid": list(self.patch_grid),
            "merge_size": int(vcfg.spatial_merge_size),
            "window_size": int(vcfg.window_size),
            "fullatt_block_indexes": [int(i) for i in vcfg.fullatt_block_indexes],
            "mrope_section": list(self.mrope_section),
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }
        return d


def qwen_processor(max_context: int, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """The offline tokenizer and a Qwen2.5-VL processor (Qwen2-VL image processor, the Qwen chat template) for
    made checkpoints; ``(processor, special token ids, vocabulary size)``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmprune.models.qwen2_5_vl.tokenizer import QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS, build_qwen_tokenizer

    raw = build_qwen_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        model_max_length=max_context,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=QWEN_CHAT_TEMPLATE)
    return processor, ids, raw.get_vocab_size()


def _processor_class():
    """``Qwen2_5_VLProcessor`` without a video processor. transformers' video processors need torchvision, which
    vlmprune does not install (images only): the stock class refuses to build without one, and installing
    torchvision would also switch every image processor to its torchvision backend."""
    from transformers import Qwen2_5_VLProcessor

    class QwenImageProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return QwenImageProcessor


def load_processor(path: Path, trust_remote_code: bool = False):
    """The family's processor loader (``Family.processor_loader``): the checkpoint's image processor (Pillow
    backend), tokenizer and chat template, as ``Qwen2_5_VLProcessor`` builds them, without the video side."""
    import json

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


def save_processor(processor, folder: Path) -> None:
    """The files a Qwen2.5-VL checkpoint ships: preprocessor config, tokenizer, chat template."""
    import json

    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
