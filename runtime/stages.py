"""Where each stage of a request runs: preprocessing, text encoder, vision graph (encoder + pruning), decoder.

One planner decides, for a bundle, its engines (``--engines KEY``), the ONNX Runtime provider and this machine, which
backend and device every stage uses; the pipeline builds exactly what it plans, and ``prune-run --plan`` prints the
plan without loading any graph. The rules:
- a graph with a TensorRT engine in ``--engines`` runs on TensorRT (vision buckets, text encoder, and the decoder,
  whose KV cache then stays in device memory, see ``trt_decoder``); ``--decoder plain|fused`` keeps the decoder on
  ONNX Runtime;
- every other graph runs on ONNX Runtime with the first available of the TensorRT, CUDA and CPU providers
  (``--provider`` picks one). The decoder skips ONNX Runtime's TensorRT provider unless asked for by name: with a
  cache that grows every step it would build TensorRT engines at start and again for shapes outside its profile;
  a decoder engine from ``prune-build --decoder`` is the TensorRT path. When it is asked for, it gets the manifest's
  optimisation profile (``trt_profile``), like the engine;
- the fused decoder where the bundle has one and it runs on the chosen provider (``decoder_fused.providers``);
  the decoder's own ``providers`` (int8/int4 MatMulNBits: CPU and CUDA) limit where the plain one runs.

On a machine with an NVIDIA GPU, a model stage that would run on the CPU gets a one-line warning naming the fix;
``--require-gpu`` makes it an error (and also refuses a machine without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from vlmprune.bundle import Bundle, Derived, bucket_for
from vlmprune.errors import VlmpruneError

from .backends import _PREFERRED, choose_providers
from .gpu import GPU_PROVIDERS, Environment, detect_environment, ort_gpu_fix
from .trt_decoder import binding_plan, manifest_dtypes
from .trt_profile import Profile, decoder_profile, shape_strings, text_encoder_profile

LABELS = {"preprocess": "preprocess", "text_encoder": "text encoder", "vision": "vision+prune", "decoder": "decoder"}
MODEL_STAGES = ("text_encoder", "vision", "decoder")
DECODER_CHOICES = ("auto", "fused", "plain")
TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
SHORT = {TRT_EP: "TensorRT", CUDA_EP: "CUDA", CPU_EP: "CPU"}
GPU_DEVICE = "cuda:0"


@dataclass
class Stage:
    stage: str  # preprocess, text_encoder, vision, decoder
    backend: str  # numpy, onnxruntime, tensorrt, none
    device: str  # cpu, cuda:0, or "-" for a stage the bundle does not have
    file: str | None = None  # bundle-relative
    providers: list[str] = field(default_factory=list)  # ONNX Runtime's, in order
    kind: str | None = None  # decoder: tensorrt, fused or plain
    detail: str = ""
    engine: str | None = field(default=None, repr=False)  # the file's name in the engines record
    provider_options: list[dict] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {"stage": self.stage, "backend": self.backend, "device": self.device, "file": self.file}
        if self.providers:
            out["providers"] = list(self.providers)
        if self.kind:
            out["kind"] = self.kind
        if self.detail:
            out["detail"] = self.detail
        return out

    def line(self) -> str:
        backend = self.backend
        if self.backend == "onnxruntime" and self.providers:
            backend = f"onnxruntime {SHORT.get(self.providers[0], self.providers[0])}"
        if self.kind in ("fused", "plain"):
            backend += f" ({self.kind})"
        parts = [p for p in (self.file, self.detail) if p]
        return f"  {LABELS[self.stage]:<13} {backend:<27} {self.device:<7} {'; '.join(parts)}".rstrip()

    def observed(self, providers: list[str]) -> "Stage":
        """This ONNX Runtime stage as its loaded session reports it (a GPU provider that failed to start is gone)."""
        return replace(self, providers=list(providers), device=_device(providers))


def _device(providers: list[str]) -> str:
    return GPU_DEVICE if providers and providers[0] in GPU_PROVIDERS else "cpu"


def fused_refusal(manifest: dict, choice: str, positions: str, first_provider: str) -> str | None:
    """Why the fused decoder is not used (None: it is)."""
    fused = manifest.get("decoder_fused")
    if choice == "plain":
        return "asked for the plain decoder"
    if not fused:
        why = manifest.get("decoder_fused_missing")  # a family whose decoder the builder cannot write says why
        if isinstance(why, str) and why:
            return f"the bundle has no fused decoder: {why[:200]}"
        return "the bundle has no fused decoder (exported with --no-fused-decoder or without onnxruntime-genai)"
    if positions != fused.get("positions", "contiguous"):
        return f"the fused decoder numbers tokens by cache position; --positions {positions} needs the plain one"
    if first_provider not in fused["providers"]:
        return f"the fused decoder is for {', '.join(fused['providers'])}, not {first_provider}"
    return None


class StagePlanner:
    def __init__(self, manifest: dict, engines: Derived | None, env: Environment, *, provider: str | None = None,
                 positions: str = "contiguous", decoder: str = "auto", engines_dir: str | None = None):
        if decoder not in DECODER_CHOICES:
            raise VlmpruneError(f"unknown decoder choice {decoder!r}", "choose auto, fused or plain")
        self.manifest, self.engines, self.env = manifest, engines, env
        self.provider, self.positions, self.decoder_choice = provider, positions, decoder
        self.files = dict(engines.meta["files"]) if engines is not None else {}
        self.engines_dir = engines_dir or (f"engines/{engines.folder.name}" if engines is not None else "")

    # --- one stage each ------------------------------------------------------------------------------------------

    def preprocess(self) -> Stage:
        return Stage("preprocess", "numpy", "cpu", detail="Pillow resize and crop, numpy normalisation")

    def text_encoder(self) -> Stage:
        te = self.manifest.get("text_encoder")
        if not te:
            return Stage("text_encoder", "none", "-", detail="the bundle has none (its method does not read the prompt)")
        if "text_encoder" in self.files:
            return self._trt("text_encoder", self.files["text_encoder"])
        return self._ort("text_encoder", te["file"], profile=text_encoder_profile(te))

    def vision(self, bucket: dict) -> Stage:
        if self.engines is not None:
            rel = self.files.get(bucket["name"])
            if rel is None:
                raise VlmpruneError(f"engines {self.engines.folder.name} have no engine for bucket {bucket['name']}",
                                    "rebuild them with prune-build, or run without --engines")
            return self._trt("vision", rel)
        return self._ort("vision", bucket["file"])

    def decoder(self) -> Stage:
        spec = self.manifest["decoder"]
        if "decoder" in self.files and self.decoder_choice == "auto":
            stage = self._trt("decoder", self.files["decoder"], kind="tensorrt")
            plan = binding_plan(spec, spec["max_context"], manifest_dtypes(spec, self.engines.meta.get("trt_version")))
            stage.detail = "; ".join(p for p in (plan.summary(), stage.detail) if p)
            return stage
        stage = self._ort("decoder", spec["file"], decoder=True, profile=decoder_profile(spec))
        why_not = fused_refusal(self.manifest, self.decoder_choice, self.positions, stage.providers[0])
        if why_not is not None and self.decoder_choice == "fused":
            raise VlmpruneError(f"cannot use the fused decoder: {why_not}", "use the plain decoder (--decoder auto)")
        notes = []
        if "decoder" in self.files:
            notes.append(f"the decoder engine is not used (--decoder {self.decoder_choice})")
        if why_not is None:
            fused = self.manifest["decoder_fused"]
            stage = replace(stage, file=fused["file"], kind="fused")
            where = "device" if stage.device != "cpu" else "host"
            notes.insert(0, f"KV buffer of {fused['buffer_length']} tokens in {where} memory, written in place")
        else:
            stage.kind = "plain"
            where = "device OrtValues" if stage.device != "cpu" else "host memory"
            notes.insert(0, f"KV cache in {where} (I/O binding)")
            if self.decoder_choice != "plain":
                notes.append(f"not fused: {why_not}")
        stage.detail = "; ".join(p for p in [*notes, stage.detail] if p)
        return stage

    def plan(self, bucket: dict) -> list[Stage]:
        return [self.preprocess(), self.text_encoder(), self.vision(bucket), self.decoder()]

    # --- backends --------------------------------------------------------------------------------------------------

    def _trt(self, name: str, rel: str, kind: str | None = None) -> Stage:
        detail = "" if self.env.tensorrt else "TensorRT is not installed here"
        return Stage(name, "tensorrt", GPU_DEVICE, f"{self.engines_dir}/{rel}", kind=kind, detail=detail, engine=rel)

    def ort_providers(self, decoder: bool = False) -> tuple[list[str], list[str]]:
        """This stage's ONNX Runtime providers, and notes on what was left out and why."""
        available, notes = self.env.ort_providers, []
        if self.provider:
            providers = choose_providers(self.provider, available)
        else:
            providers = [p for p in _PREFERRED if p in available]
            if decoder and TRT_EP in providers and len(providers) > 1:
                providers.remove(TRT_EP)
                notes.append("ONNX Runtime's TensorRT provider is left to the vision graphs (a growing cache would "
                             "rebuild its engines; build a decoder engine for TensorRT)")
        allowed = self.manifest["decoder"].get("providers") if decoder else None
        if allowed:  # int8/int4 MatMulNBits: an ONNX Runtime contrib op with CPU and CUDA kernels only
            kept = [p for p in providers if p in allowed]
            if kept != providers:
                quant = self.manifest["decoder"].get("quantization") or {}
                what = f"int{quant['bits']} MatMulNBits" if quant.get("bits") else "this decoder"
                notes.append(f"{what} runs on {', '.join(SHORT.get(p, p) for p in allowed)} only")
            providers = kept or [CPU_EP]
        return providers or [CPU_EP], notes

    def _ort(self, name: str, file: str, *, decoder: bool = False, profile: Profile | None = None) -> Stage:
        providers, notes = self.ort_providers(decoder)
        options = None
        if TRT_EP in providers and profile is not None:  # the manifest's profile, as prune-build would use
            shapes = shape_strings(profile)
            options = [{f"trt_profile_{k}_shapes": shapes[k] for k in ("min", "opt", "max")} if p == TRT_EP else {}
                       for p in providers]
        return Stage(name, "onnxruntime", _device(providers), file, providers=providers, detail="; ".join(notes),
                     provider_options=options)

    # --- devices ---------------------------------------------------------------------------------------------------

    def device_problem(self, stages: list[Stage]) -> tuple[str, str] | None:
        """(problem, fix) when a model stage would run on the CPU; None when every one runs on the GPU."""
        on_cpu = [s for s in stages if s.stage in MODEL_STAGES and s.backend != "none" and s.device == "cpu"]
        if not on_cpu:
            return None
        names = ", ".join(LABELS[s.stage] for s in on_cpu)
        engine_fix = "or build engines with `prune-build BUNDLE --decoder` and pass --engines"
        if self.provider and _device(choose_providers(self.provider, self.env.ort_providers)) == "cpu":
            why, fix = f"--provider {self.provider} was given", f"drop --provider {self.provider}"
        elif not self.env.ort_has_gpu:
            why = f"this ONNX Runtime has no GPU provider (only {', '.join(self.env.ort_providers)})"
            fix = f"{ort_gpu_fix(self.env.gpu)}, {engine_fix}"
        elif any(s.stage == "decoder" for s in on_cpu) and _device(self.ort_providers(decoder=True)[0]) == "cpu":
            allowed = self.manifest["decoder"].get("providers") or []
            why = f"the decoder graph runs on {', '.join(SHORT.get(p, p) for p in allowed)} only"
            fix = "use --provider cuda"
        else:  # planned on the GPU, and the loaded session says otherwise
            why = "ONNX Runtime could not start its GPU provider (its CUDA or cuDNN libraries did not load)"
            fix = ("install the CUDA and cuDNN versions this onnxruntime-gpu was built for (on Jetson: the JetPack "
                   f"build of onnxruntime-gpu), {engine_fix}")
        return f"the {names} would run on the CPU: {why}", fix

    def check_devices(self, stages: list[Stage], require_gpu: bool = False) -> list[str]:
        """Warning lines for a GPU machine whose model stages would fall to the CPU; with ``require_gpu``, an error
        instead (and on a machine without a GPU)."""
        gpu = self.env.gpu
        if require_gpu and not gpu.present:
            raise VlmpruneError("--require-gpu: no NVIDIA GPU found on this machine (no /dev/nvidia0, "
                                "/proc/driver/nvidia, nvidia-smi or Jetson tegra files)",
                                "run on the device; in a container, start it with --runtime nvidia (Jetson) or --gpus all")
        found = self.device_problem(stages)
        warnings = []
        if found is not None:
            problem, fix = found
            if require_gpu:
                raise VlmpruneError(f"--require-gpu: {problem}", fix)
            if gpu.present:
                warnings.append(f"warning: this machine has an NVIDIA GPU ({gpu.label()}), but {problem}; fix: {fix}")
        trt = [s for s in stages if s.backend == "tensorrt"]
        if trt and not self.env.tensorrt:
            warnings.append(f"warning: the {', '.join(LABELS[s.stage] for s in trt)} have TensorRT engines, but the "
                            "TensorRT Python module is not installed here, so the run would stop at the first one; "
                            "fix: run on the device that built them (JetPack ships TensorRT) or drop --engines")
        return warnings


def report_lines(stages: list[Stage], env: Environment, title: str = "stages") -> list[str]:
    gpu = f"NVIDIA GPU: {env.gpu.label()}" if env.gpu.present else "no NVIDIA GPU"
    ort = ", ".join(SHORT.get(p, p) for p in env.ort_providers if p in SHORT)
    head = f"{title} ({gpu}; ONNX Runtime providers: {ort}; TensorRT {'installed' if env.tensorrt else 'not installed'}):"
    return [head] + [s.line() for s in stages]


def environment_dict(env: Environment) -> dict:
    return {"gpu": {"present": env.gpu.present, "kind": env.gpu.kind, "name": env.gpu.name,
                    "evidence": env.gpu.evidence},
            "ort_providers": list(env.ort_providers), "tensorrt_installed": env.tensorrt}


def plan_bundle(folder: str | Path, *, engines: str | None = None, provider: str | None = None,
                positions: str | None = None, decoder: str = "auto", keep: float | None = None, verify: str = "quick",
                require_gpu: bool = False, env: Environment | None = None) -> dict:
    """``prune-run --plan``: the bundle and its engines are opened and verified like a run; no graph is loaded.
    ``positions`` None: the bundle's own (its family's default for its method, recorded at export)."""
    from .family import runtime_class

    bundle = Bundle.open(folder, verify)
    if positions is None:
        positions = runtime_class(bundle.manifest).default_positions(bundle.manifest)
    derived = bundle.engines(engines) if engines is not None else None
    env = env or detect_environment()
    planner = StagePlanner(bundle.manifest, derived, env, provider=provider, positions=positions, decoder=decoder)
    bucket, message = bucket_for(bundle.manifest, keep)
    stages = planner.plan(bucket)
    warnings = planner.check_devices(stages, require_gpu)
    return {"bucket": bucket["name"], "bucket_choice": message, "engines": engines, "stages": stages,
            "warnings": warnings, "env": env}
