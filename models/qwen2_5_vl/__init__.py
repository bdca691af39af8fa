"""Qwen2.5-VL: a window-attention ViT with full-attention blocks, a 2x2 merger, no CLS and M-RoPE positions in the
decoder; GridPrune's relevance from an auxiliary CLIP. Pruned per static image size."""

from vlmprune.models.presets import PresetSpec
from vlmprune.models.registry import Capabilities, DecoderIO, Family, FamilyOption, RuntimeRecipe

PRESETS = (
    PresetSpec(
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
        spatial_merge=2,
    ),
    # As in Qwen2.5-VL-7B at 448 x 448 (a 32-block, 1280-wide window-attention ViT on 1,024 patches before a 7B
    # decoder on ~300 tokens), the vision encoder is about a fifth of the unpruned time to first token.
    PresetSpec(
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
        spatial_merge=2,
    ),
)

FAMILY = Family(
    model_type="qwen2_5_vl",
    name="Qwen2.5-VL",
    transformers_class="Qwen2_5_VLForConditionalGeneration",
    adapter="vlmprune.models.qwen2_5_vl.adapter:QwenAdapter",
    # FoPru and GridPrune's saliency read the last full-attention block ("last_full_attention"); no CLS, and
    # GridPrune's relevance comes from an auxiliary CLIP (--clip), not from the encoder's own space.
    capabilities=Capabilities(has_cls=False, global_attention_layer="last_full_attention", clip_joint_space=False,
                              auxiliary_clip=True),
    recipe=RuntimeRecipe(preprocess="qwen2_vl", layout="single_view", positions="mrope"),
    # The pruning subgraph, and every RMSNorm (Qwen's norms upcast to fp32 in transformers too).
    fp32_scopes=(r"(^|/)method/", r"norm|ln_q|RMSNorm|SimplifiedLayerNormalization"),
    decoder_io=DecoderIO(position_rank=3),
    vision_modules=("model.visual",),
    processor_loader="vlmprune.models.qwen2_5_vl.adapter:load_processor",
    runtime="vlmprune.models.qwen2_5_vl.runtime:QwenRuntime",
    export="vlmprune.models.qwen2_5_vl.export:QwenExport",
    key="qwen2_5_vl",
    preset_writer="vlmprune.models.qwen2_5_vl.preset:write_qwen_preset",
    presets=PRESETS,
    options=(FamilyOption("--image-size", "image_sizes", "Qwen2.5-VL: the static image size of the buckets, HxW "
                          "(multiples of 28; default 448x448)", "vlmprune.models.qwen2_5_vl.preprocess:parse_image_sizes",
                          "HxW"),),
    decoders=("plain",),
    missing_decoders=(("tensorrt", "the TensorRT decoder runtime takes [B, S] positions, and this family's M-RoPE "
                                   "decoder takes position_ids [3, B, S]"),
                      ("fused", "ONNX Runtime GenAI's builder is not wired for its M-RoPE text model in this version")),
    # the model's own layout (original), except FoPru, whose lab code numbers the kept tokens contiguously
    default_positions="original",
    method_positions=(("fopru", "contiguous"),),
)
