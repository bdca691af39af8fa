"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT vision tower, MLP projector, Llama decoder."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from vlmprune.errors import VlmpruneError
from vlmprune.runtime.preprocess import resample_name

from vlmprune.models.adapter import ClipText, Preprocessing, TextSpec, ViewSpec, VisionSpec, VLMAdapter



def _first_attr(obj, *names):
    for name in names:
        cur = obj
        for part in name.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise AttributeError(f"{type(obj).__name__} has none of {names}")


def _size_value(size, *keys):
    if isinstance(size, int):
        return size
    size = dict(size or {})
    for key in keys:
        if size.get(key) is not None:
            return int(size[key])
    raise ValueError(f"image processor size {size} has none of {keys}")


def preprocessing_from(image_processor) -> Preprocessing:
    ip = image_processor
    crop = ip.crop_size if getattr(ip, "do_center_crop", True) else ip.size
    resample = getattr(ip, "resample", 3)
    resample = resample_name(resample)
    return Preprocessing(
        resize_shortest_edge=_size_value(ip.size, "shortest_edge", "height"),
        crop_size=(_size_value(crop, "height"), _size_value(crop, "width")),
        resample=resample,
        do_resize=bool(getattr(ip, "do_resize", True)),
        do_center_crop=bool(getattr(ip, "do_center_crop", True)),
        do_rescale=bool(getattr(ip, "do_rescale", True)),
        rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
        do_normalize=bool(getattr(ip, "do_normalize", True)),
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
        do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
    )


class LlavaAdapter(VLMAdapter):
    arch = "llava"

    def __init__(self, model, processor, path: Path, source: str, clip: ClipText | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.path = Path(path)
        self.source = source
        self.clip = clip
        cfg = model.config
        vcfg = cfg.vision_config
        feature_layer = cfg.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise VlmpruneError(
                f"vision_feature_layer={feature_layer} (several layers) is not supported",
                "vlmprune prunes one feature layer; use a checkpoint with an integer vision_feature_layer",
            )
        if cfg.vision_feature_select_strategy != "default":
            raise VlmpruneError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported",
                "LLaVA-1.5 checkpoints use 'default' (CLS dropped)",
            )
        n_layers = vcfg.num_hidden_layers
        layers_run = feature_layer % (n_layers + 1)  # hidden_states[i] is the output of i layers
        if layers_run < 1:
            raise VlmpruneError(f"vision_feature_layer={feature_layer} selects the embeddings", "use a layer >= 1")
        side = vcfg.image_size // vcfg.patch_size
        self.preprocessing = preprocessing_from(processor.image_processor)
        self.vision = VisionSpec(
            patch_size=vcfg.patch_size,
            hidden_size=vcfg.hidden_size,
            num_heads=vcfg.num_attention_heads,
            num_layers=n_layers,
            feature_layer=feature_layer,
            layers_run=layers_run,
            views=(ViewSpec("base", (vcfg.image_size, vcfg.image_size), (side, side), True),),
        )
        tcfg = cfg.text_config
        heads = tcfg.num_attention_heads
        self.text = TextSpec(
            hidden_size=tcfg.hidden_size,
            vocab_size=tcfg.vocab_size,
            num_layers=tcfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(tcfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads,
            max_context=tcfg.max_position_embeddings,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            image_token=getattr(processor, "image_token", "<image>"),
            image_token_id=int(getattr(cfg, "image_token_id", None) or cfg.image_token_index),
            chat_template=getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None),
        )

    # transformers >= 4.52 nests the towers under `.model`; CLIP's vision layers moved out of `.vision_model` in 5.x.
    @property
    def _tower(self):
        tower = _first_attr(self.model, "model.vision_tower", "vision_tower")
        return getattr(tower, "vision_model", tower)

    @property
    def _layers(self):
        return self._tower.encoder.layers

    def hidden_before_scoring(self, pixel_values: Tensor) -> Tensor:
        tower = self._tower
        h = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype)))
        for layer in self._layers[: self.vision.layers_run - 1]:
            h = _layer_out(layer(h, None))
        return h

    def scoring_layer(self, hidden: Tensor) -> Tensor:
        return _layer_out(self._layers[self.vision.layers_run - 1](hidden, None))

    def scoring_qk(self, hidden: Tensor):
        layer = self._layers[self.vision.layers_run - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        b, t, _ = x.shape
        dim = self.vision.head_dim
        # The same view/transpose as CLIPAttention, so graph optimisers can share these with the encoder's own.
        q = attn.q_proj(x).view(b, t, -1, dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def select_patches(self, features: Tensor) -> Tensor:
        return features[:, 1:]

    def project(self, patches: Tensor) -> Tensor:
        return _first_attr(self.model, "model.multi_modal_projector", "multi_modal_projector")(patches)

    def reference_image_features(self, pixel_values: Tensor) -> Tensor:
        tower = _first_attr(self.model, "model.vision_tower", "vision_tower")
        out = tower(pixel_values, output_hidden_states=True)
        return self.project(self.select_patches(out.hidden_states[self.vision.feature_layer]))

    def joint_embeds(self, patches: Tensor) -> Tensor:
        clip = self._need_clip()
        projection = clip.model.visual_projection
        # CLIP's projection stays fp32 even when the tower runs in fp16 (it belongs to the pruning subgraph)
        return projection(self._tower.post_layernorm(patches).to(projection.weight.dtype))

    def text_embeds(self, input_ids: Tensor) -> Tensor:
        clip = self._need_clip()
        out = clip.model.get_text_features(input_ids=input_ids)
        feats = out if isinstance(out, Tensor) else out.pooler_output
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _need_clip(self) -> ClipText:
        if self.clip is None:
            raise VlmpruneError(
                "GridPrune needs a CLIP text tower and visual projection, and none was loaded",
                "pass --clip PATH|HF-ID (openai/clip-vit-large-patch14-336 layout) or use the tiny-llava preset",
            )
        return self.clip

    def embedding_table(self) -> Tensor:
        return self.model.get_input_embeddings().weight

    def language_model(self):
        return _first_attr(self.model, "model.language_model", "language_model.model")

    def lm_head(self):
        return self.model.lm_head


def _layer_out(out):
    # Encoder layers return a tensor in transformers 5 and a tuple before.
    return out[0] if isinstance(out, (tuple, list)) else out
