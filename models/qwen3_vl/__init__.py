"""Qwen3-VL: a full-attention ViT (patch 16, learned position embeddings), a 2x2 merger, DeepStack features of three
encoder blocks added to the first decoder layers at the visual positions, and interleaved M-RoPE in the decoder;
no CLS, GridPrune's relevance from an auxiliary CLIP. Pruned per static image size; built on the Qwen2.5-VL family
(its methods, positions, preprocessing and auxiliary CLIP are imported from ``models/qwen2_5_vl``)."""

from vlmprune.models.presets import PresetSpec
from vlmprune.models.registry import Capabilities, DecoderIO, Family, FamilyOption, RuntimeRecipe

PRESETS = (
    PresetSpec(
        name="tiny-qwen3-vl",
        description="Qwen3-VL geometry (patch 16, temporal patch 2, 2x2 merger, 48x48 learned position table, "
                    "DeepStack at three blocks, interleaved M-RoPE, tied embeddings), tiny widths; 448x448 gives "
                    "196 merged tokens",
        vision_hidden=64,
        vision_layers=4,
        vision_heads=4,
        vision_intermediate=128,
        text_hidden=128,
        text_layers=3,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        max_context=2048,
        image_size=448,
        patch_size=16,
        seed=6,
        spatial_merge=2,
    ),
    # Qwen3-VL-4B at 448 x 448: a 24-block, 1024-wide ViT (MLP 4096) on 784 patches plus four 4096-wide mergers is
    # ~0.29 TMAC; the 36-layer, 2560-wide decoder on ~216 prompt tokens ~0.79 TMAC, so the vision encoder is ~27 %
    # of the unpruned time to first token by compute (preset.ttft_macs). This preset's share by the same count is
    # within 0.05 of it (tests/test_qwen3_vl.py::test_bench_preset_vision_share).
    PresetSpec(
        name="bench-qwen3-vl",
        description="Qwen3-VL geometry with vision/decoder cost in Qwen3-VL-4B proportions, for prune-bench",
        vision_hidden=128,
        vision_layers=8,
        vision_heads=4,
        vision_intermediate=512,
        text_hidden=512,
        text_layers=12,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate=1536,
        max_context=2048,
        image_size=448,
        patch_size=16,
        seed=7,
        spatial_merge=2,
    ),
)

FAMILY = Family(
    model_type="qwen3_vl",
    name="Qwen3-VL",
    transformers_class="Qwen3VLForConditionalGeneration",
    adapter="vlmprune.models.qwen3_vl.adapter:Qwen3Adapter",
    # every block attends globally: FoPru and GridPrune's saliency read the last one
    capabilities=Capabilities(has_cls=False, global_attention_layer="last_full_attention", clip_joint_space=False,
                              auxiliary_clip=True),
    recipe=RuntimeRecipe(preprocess="qwen2_vl", layout="single_view", positions="mrope"),
    # the pruning subgraph, the encoder's LayerNorms and the decoder's RMSNorms
    fp32_scopes=(r"(^|/)method/", r"norm|LayerNormalization|RMSNorm|SimplifiedLayerNormalization"),
    scoring_attention_scope="/blocks.{layer}/attn/",
    decoder_io=DecoderIO(position_rank=3),
    vision_modules=("model.visual",),
    processor_loader="vlmprune.models.qwen3_vl.adapter:load_processor",
    runtime="vlmprune.models.qwen3_vl.runtime:Qwen3Runtime",
    export="vlmprune.models.qwen3_vl.export:Qwen3Export",
    key="qwen3_vl",
    preset_writer="vlmprune.models.qwen3_vl.preset:write_qwen3_preset",
    presets=PRESETS,
    options=(FamilyOption("--image-size", "image_sizes", "Qwen2.5-VL / Qwen3-VL: the static image size of the "
                          "buckets, HxW (multiples of 28 / 32; default 448x448)",
                          "vlmprune.models.qwen3_vl.preprocess:parse_image_sizes", "HxW"),),
    decoders=("plain",),
    missing_decoders=(("tensorrt", "the TensorRT decoder runtime takes [B, S] positions and no DeepStack input, and "
                                   "this family's decoder takes position_ids [3, B, S] and DeepStack rows"),
                      ("fused", "ONNX Runtime GenAI's builder has no DeepStack input in its Qwen3-VL text model, "
                                "whose prefill would lose the DeepStack features")),
    default_positions="original",
    method_positions=(("fopru", "contiguous"),),
)
