"""A random-weight checkpoint at real scale, written exactly as checkpoints are published.

TinyLLaVA-1.1B geometry (CLIP ViT-L/14-336 vision tower; a Llama decoder 2048 wide, 22 layers, 32 heads, 4 KV
heads, 5632 intermediate, 32000 vocabulary) in the ``llava-hf`` layout: sharded fp16 safetensors with a
``model.safetensors.index.json``, the legacy tensor names (``language_model.model.layers.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.lm_head.weight``), a config that
says ``torch_dtype: float16``, a tokenizer and a processor. The decoder alone is 2.1 GB in fp16, over protobuf's
2 GiB limit once it is fp32, so it exercises everything a 7B export needs at a size a 2-core machine can run.

    python -m vlmprune.models.scale_fixture OUT_DIR [--layers 22] [--shard-mb 2000]

Tensors are generated one at a time and written shard by shard, so writing it holds at most one shard in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vlmprune.errors import VlmpruneError

# Modern transformers names -> the names published llava-hf checkpoints carry (transformers maps them back on load).
_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def legacy_name(name: str) -> str:
    for new, old in _LEGACY:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def fixture_config(layers: int = 22, vocab: int = 32000, ids: dict | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    ids = ids or {"<s>": 1, "</s>": 2, "<pad>": 0, "<image>": 3}
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<image>"], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def _random(name: str, shape: tuple[int, ...], gen):
    """Fan-in scaled normals (as the presets), so activations stay unit-scale through 22 layers in fp16."""
    import torch

    if len(shape) >= 2:
        t = torch.randn(shape, generator=gen) * (torch.tensor(shape[1:]).prod().item() ** -0.5)
    elif "norm" in name and name.endswith("weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif name.endswith("class_embedding"):
        t = torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(torch.float16)


def write_scale_checkpoint(out: Path, *, layers: int = 22, shard_mb: int = 2000, seed: int = 0,
                           progress=print) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from vlmprune.models.llava.preset import llava_processor

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlmpruneError(f"{out} exists and is not empty", "choose a new folder for the checkpoint")
    processor, ids, _ = llava_processor(336, 14, 2048)
    config = fixture_config(layers, ids=ids)
    with torch.device("meta"):  # names and shapes only, no memory
        shapes = {legacy_name(n): tuple(p.shape) for n, p in LlavaForConditionalGeneration(config).state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        limit = shard_mb * 1_000_000
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape in shapes.items():  # plan shards in order, ~shard_mb each
            nbytes = 2 * int(torch.tensor(shape).prod().item()) if shape else 2
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        weight_map, total = {}, 0
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: _random(n, shapes[n], gen) for n in names}
            total += sum(t.numel() * 2 for t in tensors.values())
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
            weight_map.update({n: file for n in names})
            progress(f"  wrote {file} ({len(names)} tensors)")
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["torch_dtype"] = "float16"  # as published checkpoints say
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        processor.save_pretrained(tmp)
        (tmp / "VLMPRUNE_SCALE_FIXTURE").write_text(f"TinyLLaVA-1.1B geometry, {layers} decoder layers, seed {seed}\n")
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmprune.models.scale_fixture",
                                description="Write a random-weight LLaVA checkpoint at TinyLLaVA-1.1B geometry as "
                                            "sharded fp16 safetensors in the llava-hf layout.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="new folder to write")
    p.add_argument("--layers", type=int, default=22, help="decoder layers")
    p.add_argument("--shard-mb", type=int, default=2000, help="shard size in MB")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    try:
        path = write_scale_checkpoint(args.out, layers=args.layers, shard_mb=args.shard_mb, seed=args.seed)
    except VlmpruneError as exc:
        print(f"scale_fixture: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
