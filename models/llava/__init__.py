"""LLaVA-1.5: a CLIP ViT-L/336 view with CLS, penultimate-layer features, an MLP projector and a Llama/Vicuna
decoder; the K kept tokens replace the ``<image>`` placeholder. The declaration below is all the registry reads;
the parts it names import on use (``adapter``/``export``/``preset``: torch; ``runtime``: torch-free)."""

from vlmprune.models.presets import PresetSpec
from vlmprune.models.registry import Capabilities, Family, RuntimeRecipe

PRESETS = (
    PresetSpec(
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
    PresetSpec(
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
)

FAMILY = Family(
    model_type="llava",
    name="LLaVA-1.5",
    transformers_class="LlavaForConditionalGeneration",
    adapter="vlmprune.models.llava.adapter:LlavaAdapter",
    capabilities=Capabilities(has_cls=True, global_attention_layer="feature", clip_joint_space=True),
    recipe=RuntimeRecipe(preprocess="clip", layout="single_view", positions="1d"),
    runtime="vlmprune.models.llava.runtime:LlavaRuntime",
    export="vlmprune.models.llava.export:LlavaExport",
    key="llava",
    preset_writer="vlmprune.models.llava.preset:write_preset",
    presets=PRESETS,
    fused_architecture="LlamaForCausalLM",
    bench_peers=True,
)
