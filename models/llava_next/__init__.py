"""LLaVA-NeXT (anyres): a base view plus the crops of the image's best pinpoint, the crops' features unpadded into a
raster with a newline token per row. Pruned per view and layout; the runtime picks the layout from the image."""

from vlmprune.models.presets import PresetSpec
from vlmprune.models.registry import Capabilities, Family, FamilyOption, RuntimeRecipe

# llava-hf/llava-v1.6-*-hf's image_grid_pinpoints
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

PRESETS = (
    PresetSpec(
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
        grid_pinpoints=LLAVA_V16_PINPOINTS,
    ),
    # bench-llava's widths on the NeXT geometry: as in LLaVA-NeXT-7B (ViT-L/336 on 5 views + a 7B decoder on ~2,900
    # image tokens) the vision encoder stays a few percent of the unpruned time to first token.
    PresetSpec(
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
        grid_pinpoints=LLAVA_V16_PINPOINTS,
    ),
)

FAMILY = Family(
    model_type="llava_next",
    name="LLaVA-NeXT",
    transformers_class="LlavaNextForConditionalGeneration",
    adapter="vlmprune.models.llava_next.adapter:LlavaNextAdapter",
    capabilities=Capabilities(has_cls=True, global_attention_layer="feature", clip_joint_space=True),
    recipe=RuntimeRecipe(preprocess="anyres", layout="anyres_raster", positions="1d"),
    runtime="vlmprune.models.llava_next.runtime:LlavaNextRuntime",
    export="vlmprune.models.llava_next.export:LlavaNextExport",
    key="llava_next",
    preset_writer="vlmprune.models.llava_next.preset:write_preset",
    presets=PRESETS,
    options=(FamilyOption("--layouts", "layouts", "LLaVA-NeXT: export only these pinpoint layouts, e.g. 2x1,1x2 "
                          "(default: every layout of the checkpoint)", "vlmprune.models.llava_next.geometry:parse_layouts",
                          "RxC,..."),),
    fused_architecture="LlamaForCausalLM",
    # the authors' code: G-Prune keeps original positions (gaps); FoPru's lab numbers the kept tokens contiguously
    method_positions=(("gprune", "original"),),
)
