"""The edge pipeline, one for every family: image -> preprocess -> (text encoder) -> vision graph of the chosen
bucket -> stitch -> decoder prefill -> generation, with per-stage timings. What differs per family (preprocessing,
bucket choice, the graph's image inputs, stitching and positions) comes from the family's runtime hooks
(``runtime/family.py``), picked once from the manifest. ``open_bundle`` is the one way in. Torch- and
transformers-free."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmprune import graph_io
from vlmprune.bundle import Bundle
from vlmprune.errors import VlmpruneError
from vlmprune.models.registry import family_by_key

from .backends import OrtBackend, OrtDecoder, check_io
from .decode_loop import decode
from .family import FamilyRuntime, Stitched, View, family_key
from .fused_decoder import FusedDecoder
from .gpu import detect_environment
from .preprocess import load_image
from .prompt import PromptBuilder, load_tokenizer
from .sampling import check_generation_args
from .stages import Stage, StagePlanner, fused_refusal


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    text_encoder_ms: float = 0.0
    vision_ms: float = 0.0  # vision encoder + pruning (one graph)
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # request start to the first generated token
    tpot_ms: float = 0.0  # mean time per output token after the first
    total_ms: float = 0.0


@dataclass
class Result:
    text: str
    token_ids: list[int]
    bucket: str
    keep: float
    visual_tokens_kept: int
    visual_tokens_total: int
    prompt_tokens: int
    tokens_generated: int
    stop_reason: str
    kept_indices: list[int]
    timings: Timings = field(default_factory=Timings)
    view: str = ""  # the family's note on how the image was taken, e.g. "layout 2x1" or "image size 448x448"

    def to_dict(self) -> dict:
        return asdict(self)

    def timing_line(self) -> str:
        t = self.timings
        text = f" | text enc {t.text_encoder_ms:.1f} ms" if t.text_encoder_ms else ""
        view = f", {self.view}" if self.view else ""
        return (f"[{self.bucket}{view}: {self.visual_tokens_kept}/{self.visual_tokens_total} visual tokens, "
                f"{self.prompt_tokens} prompt tokens] preprocess {t.preprocess_ms:.1f} ms{text} | "
                f"vision+prune {t.vision_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms | TTFT {t.ttft_ms:.1f} ms | "
                f"TPOT {t.tpot_ms:.2f} ms x {self.tokens_generated} tokens ({self.stop_reason})")


def open_bundle(bundle: str | Path | Bundle, **kwargs) -> "Pipeline":
    """The pipeline of any bundle: verified once, its family's runtime hooks from the manifest. ``kwargs``: see
    ``Pipeline``."""
    return Pipeline(bundle, **kwargs)


@dataclass
class Request:
    """Everything of one request before the decoder: the bucket, the graph's inputs and outputs, the stitch."""

    bucket: dict
    view: View
    ids: list[int]
    outputs: dict
    stitched: Stitched
    timings: Timings
    start: float


class Pipeline:
    def __init__(self, bundle: str | Path | Bundle, *, provider: str | None = None, threads: int | None = None,
                 positions: str | None = None, verify: str = "quick", engines: str | None = None,
                 decoder: str = "auto", require_gpu: bool = False):
        if threads is not None and threads < 1:
            raise VlmpruneError(f"--threads {threads} must be at least 1", "or leave it out for ONNX Runtime's default")
        # Every file below is opened through self.bundle.path: only files of the verified integrity record. A
        # Bundle already opened (prune-run reads the positions default from it) is not verified again.
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify)
        self.folder = self.bundle.folder
        self.manifest = self.bundle.manifest
        self.declaration = family_by_key(family_key(self.manifest))  # the family's registry entry
        family_class = self.declaration.runtime_class()
        if positions is None:  # the method's default, recorded at export
            positions = family_class.default_positions(self.manifest)
        if positions not in family_class.position_modes:
            raise VlmpruneError(f"unknown positions mode {positions!r}",
                                f"choose one of {', '.join(family_class.position_modes)}")
        self.positions = positions
        self.provider = provider
        self.threads = threads
        m = self.manifest
        self.prompt = PromptBuilder(self.bundle.path(m["prompt"]["tokenizer"]), m["prompt"])
        emb = m["decoder"]["embeddings"]
        try:  # never pickle: allow_pickle stays False
            self.table = np.load(self.bundle.path(emb["file"]), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VlmpruneError(f"cannot read {emb['file']}: {str(exc)[:160]}", "re-export the bundle") from None
        if list(self.table.shape) != emb["shape"] or self.table.dtype.name != emb["dtype"]:
            raise VlmpruneError(f"{emb['file']} is {self.table.dtype.name} {list(self.table.shape)}, the manifest says "
                                f"{emb['dtype']} {emb['shape']}", "re-export")
        self.family: FamilyRuntime = family_class(self.bundle, self.table)
        self.preprocess = self.family.preprocess
        self.decoder_spec = m["decoder"]
        self.engines = None
        if engines is not None:  # TensorRT engines from prune-build (every graph that has one), verified like the bundle
            self.engines = self.bundle.engines(engines)
        # Where each stage runs: one plan, shared with `prune-run --plan` (stages.py), built exactly as planned.
        self.env = detect_environment()
        self.planner = StagePlanner(m, self.engines, self.env, provider=provider, positions=positions, decoder=decoder)
        if require_gpu:  # refused before anything large is loaded; the vision graph is checked in stage_report
            self.planner.check_devices([self.planner.text_encoder(), self.planner.decoder()], require_gpu=True)
        self.decoder = self._make_decoder(decoder)
        self.position_rank = graph_io.DecoderNames.of(m["decoder"]).position_rank  # [B, S], or [3, B, S] (M-RoPE)
        self.num_patches = self.family.num_patches
        self._vision: dict[str, OrtBackend] = {}
        self.reuse = None  # reuse.Reuse: caches shared across requests (prune-serve); None runs every graph
        self._text = None
        if m["text_encoder"]:
            self._clip_tokenizer = load_tokenizer(self.bundle.path(m["text_encoder"]["tokenizer"]), "CLIP tokenizer")

    def _backend(self, file: str, decoder_loop: bool = False, stage: Stage | None = None) -> OrtBackend:
        return OrtBackend(self.bundle.path(file), self.provider, self.threads, decoder_loop=decoder_loop,
                          providers=stage.providers if stage else None,
                          provider_options=stage.provider_options if stage else None)

    def _make_decoder(self, choice: str):
        """The decoder engine where ``--engines`` has one (TensorRT, the KV cache kept on the device); else the fused
        decoder (``decoder_fused``) where the bundle has one and ONNX Runtime runs it on this provider with these
        positions; the standard-op ``decoder`` otherwise (the TensorRT provider, gapped positions). ``choice``: auto,
        fused or plain (both of which keep the decoder on ONNX Runtime)."""
        stage = self.planner.decoder()  # also refuses an impossible choice == "fused"
        if stage.backend == "tensorrt" and "tensorrt" not in self.declaration.decoders:
            why = dict(self.declaration.missing_decoders).get("tensorrt", "its family does not support it")
            raise VlmpruneError(f"the engines' decoder cannot run this bundle on TensorRT: {why}",
                                "run the decoder on ONNX Runtime (rebuild the engines without --decoder)")
        if stage.backend == "tensorrt":
            from . import trt_decoder

            self.decoder_kind, self.decoder_note, self.decoder_stage = "tensorrt", None, stage
            return trt_decoder.load_trt_decoder(self.engines.path(stage.engine), self.engines.meta,
                                                self.manifest["decoder"])
        fused = self.manifest.get("decoder_fused")
        why_not = fused_refusal(self.manifest, choice, self.positions, stage.providers[0])
        if why_not is None:
            try:
                backend = self._backend(fused["file"], decoder_loop=True, stage=stage)
            except VlmpruneError as exc:  # e.g. an ONNX Runtime older than the graph's opset or contrib ops
                if choice == "fused":
                    raise
                why_not = f"this ONNX Runtime cannot load it ({exc.problem[:120]})"
                stage = replace(stage, file=self.manifest["decoder"]["file"], kind="plain",
                                detail=f"KV cache as OrtValues (I/O binding); not fused: {why_not}")
            else:
                self.decoder_kind, self.decoder_note = "fused", None
                self.decoder_stage = stage.observed(backend.providers)
                return FusedDecoder(backend, fused)
        self.decoder_kind, self.decoder_note = "plain", why_not
        backend = self._backend(self.manifest["decoder"]["file"], decoder_loop=True, stage=stage)
        self.decoder_stage = stage.observed(backend.providers)
        return OrtDecoder(backend, self.manifest["decoder"])

    def vision_backend(self, bucket: dict) -> OrtBackend:
        if bucket["name"] not in self._vision:  # one bucket's session at a time is what an edge box can afford
            stage = self.planner.vision(bucket)  # refuses engines without this bucket's
            if stage.backend == "tensorrt":
                from . import trt_backend

                backend = trt_backend.TrtBackend(self.engines.path(stage.engine), self.engines.meta)
            else:
                backend = self._backend(bucket["file"], stage=stage)
            self._vision[bucket["name"]] = check_io(backend, bucket, f"the graph of bucket {bucket['name']}")
        backend = self._vision[bucket["name"]]
        return backend if self.reuse is None else self.reuse.vision(backend, bucket["file"])

    def text_backend(self):
        """The text encoder's backend: its TensorRT engine where ``--engines`` has one, else ONNX Runtime."""
        if self._text is None:
            stage = self.planner.text_encoder()
            if stage.backend == "tensorrt":
                from . import trt_backend

                backend = trt_backend.TrtBackend(self.engines.path(stage.engine), self.engines.meta)
            else:
                backend = self._backend(self.manifest["text_encoder"]["file"], stage=stage)
            self._text = check_io(backend, self.manifest["text_encoder"], "the text encoder")
        return self._text

    def prepare(self, bucket: dict) -> None:
        """Open the sessions a request on this bucket needs, so that per-request timings exclude loading."""
        self.vision_backend(bucket)
        if self.manifest["text_encoder"]:
            self.text_backend()

    def stage_report(self, bucket: dict) -> list[Stage]:
        """Where each stage of a request on ``bucket`` runs, as loaded: ONNX Runtime stages say the providers their
        sessions really have (a GPU provider whose libraries failed to load is gone from them)."""
        self.prepare(bucket)
        stages = self.planner.plan(bucket)
        loaded = {"text_encoder": self._text, "vision": self._vision[bucket["name"]]}
        for i, stage in enumerate(stages):
            if stage.stage == "decoder":
                stages[i] = self.decoder_stage
            elif stage.backend == "onnxruntime" and loaded.get(stage.stage) is not None:
                stages[i] = stage.observed(loaded[stage.stage].providers)
        return stages

    def choose_bucket(self, keep: float | None, image: Image.Image | None = None) -> tuple[dict, str]:
        """The bucket for this keep ratio (or the next larger) among those ``image`` can use, and a sentence
        saying which."""
        return self.family.choose_bucket(keep, image)

    def text_embeds(self, prompt: str) -> np.ndarray:
        spec = self.manifest["text_encoder"]
        self.text_backend()
        enc = self._clip_tokenizer.encode(prompt, add_special_tokens=True)
        ids = enc.ids
        if len(ids) > spec["max_length"]:  # CLIP's 77-token window: keep the start and the end-of-text token
            ids = ids[: spec["max_length"] - 1] + ids[-1:]
        out = self._text.run(graph_io.feeds(spec["inputs"], {"input_ids": np.asarray([ids])}, "text encoder"))
        return graph_io.by_kind(spec["outputs"], out)["text_embeds"]

    def vision_feeds(self, view: View, bucket: dict, prompt: str, t: Timings | None = None) -> dict:
        """The bucket graph's feeds, by its recorded input names (``t``: the text encoder's time)."""
        values = dict(view.values)
        if graph_io.has(bucket["inputs"], "text_embeds"):
            t0 = time.perf_counter()
            values["text_embeds"] = self.text_embeds(prompt)
            if t is not None:
                t.text_encoder_ms = (time.perf_counter() - t0) * 1e3
        return graph_io.feeds(bucket["inputs"], values, f"bucket {bucket['name']}")

    def run_vision(self, view: View, bucket: dict, prompt: str, t: Timings | None = None) -> dict:
        """The bucket's graph on a prepared image: its outputs by kind."""
        feeds = self.vision_feeds(view, bucket, prompt, t)
        t0 = time.perf_counter()
        out = self.vision_backend(bucket).run(feeds)
        if t is not None:
            t.vision_ms = (time.perf_counter() - t0) * 1e3
        return graph_io.by_kind(bucket["outputs"], out)

    def request(self, image: Image.Image | str | Path, prompt: str, *, keep: float | None = None,
                bucket: dict | None = None) -> Request:
        """Everything before the decoder: the bucket, the image as its graph takes it, the graph's outputs and the
        stitched prompt, with their timings."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        if bucket is None:
            bucket, _ = self.choose_bucket(keep, image)
        else:
            self.family.check_bucket(bucket, image)
        self.prepare(bucket)
        start = time.perf_counter()
        t = Timings()
        ids = self.prompt.encode(prompt)
        max_ctx = self.decoder_spec["max_context"]
        self.family.check_prompt(ids, self.prompt.image_token_id, bucket, self.positions, max_ctx)
        view = self.family.prepare(image, bucket)
        t.preprocess_ms = (time.perf_counter() - start) * 1e3
        out = self.run_vision(view, bucket, prompt, t)
        st = self.family.stitch(ids, self.prompt.image_token_id, out, view, self.positions)
        if st.embeds.shape[1] >= max_ctx or st.next_pos >= max_ctx:
            # original positions leave gaps: the last position id counts as well as the token count
            raise VlmpruneError(f"the prompt is {st.embeds.shape[1]} tokens and its positions reach {st.next_pos - 1} "
                                f"({len(st.kept)} of {st.total} image tokens kept), which fills the model's context of "
                                f"{max_ctx}", "shorten the prompt, use a smaller keep ratio (--keep) or "
                                              "--positions contiguous")
        return Request(bucket, view, ids, out, st, t, start)

    def generate(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        *,
        keep: float | None = None,
        bucket: dict | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Result:
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        req = self.request(image, prompt, keep=keep, bucket=bucket)
        st, t = req.stitched, req.timings
        out = decode(self.decoder, self.table, st.embeds, st.positions, st.next_pos,
                     max_context=self.decoder_spec["max_context"], max_new_tokens=max_new_tokens,
                     eos=self.decoder_spec.get("eos_token_id"), decode_text=self.prompt.decode, timings=t,
                     start=req.start, temperature=temperature, top_p=top_p, seed=seed,
                     position_rank=self.position_rank, on_text=on_text, ignore_eos=ignore_eos, hooks=self.reuse,
                     prefill_inputs=st.decoder_inputs)
        return Result(
            text=out.text,
            token_ids=out.tokens,
            bucket=req.bucket["name"],
            keep=req.bucket["keep"],
            visual_tokens_kept=len(st.kept),
            visual_tokens_total=st.total,
            prompt_tokens=int(st.embeds.shape[1]),
            tokens_generated=len(out.tokens),
            stop_reason=out.stop,
            kept_indices=st.kept.tolist(),
            timings=t,
            view=req.view.note,
        )
