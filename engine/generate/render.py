"""Rendering: denoise, decode, write the video with its sidecar; reproduce a video from its sidecar; trainer samples."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from engine.core.ffmpeg import write_video
from engine.core.files import TextFileError, atomic_write_json, file_sha256, read_text
from engine.core.models import denormalize_latents
from engine.core.motion import MOTION_UNIT, MOTION_UNIT_SHORT, video_motion
from engine.core.progress import ProgressFn, StopFn
from engine.generate.draft import DraftSettings, draft_of, draft_record
from engine.generate.pipeline import (
    PipelineCache,
    PipelineOptions,
    apply_loras,
    load_pipeline,
    set_scheduler,
)
from engine.generate.request import (
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    open_image,
    prepare_image,
    resolve_request,
)

SIDECAR_VERSION = 1


# ---------------------------------------------------------------------------------------------- generation

@dataclass
class Generated:
    """A rendered video in memory, with everything its sidecar records."""

    frames: np.ndarray  # [F, H, W, 3] uint8
    request: GenerationRequest  # resolved: seed, size and frames concrete
    notes: list[str]
    loras: list[dict]
    seconds: float
    image_size: tuple[int, int]


def _decode_latents(pipe, latents: torch.Tensor, bf16: bool = False) -> np.ndarray:
    """Normalised latents -> uint8 frames, as the pipeline does (done here so a cancel skips the VAE entirely).
    `bf16`: under bf16 autocast where the VAE is on a GPU (a draft's preview decode)."""
    vae = pipe.vae
    latents = latents.to(device=pipe._execution_device, dtype=vae.dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and latents.device.type == "cuda"):
        video = vae.decode(denormalize_latents(vae, latents), return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video.float(), output_type="np")[0]
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class _RepeatedEncode:
    """`vae.encode` that answers an input equal to the last one from the last result. Each I2V generation encodes the
    start image padded to the full clip (81 x 480 x 832: ~1.9 s on an H200); a sweep, and every retry with the same
    image and size, encodes it once. Equality is checked exactly on the device (torch.equal)."""

    def __init__(self, encode):
        self.encode, self.last_input, self.last_output = encode, None, None

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        last = self.last_input
        if args or kwargs or last is None or (last.shape, last.dtype, last.device) != (x.shape, x.dtype, x.device) \
                or not torch.equal(last, x):
            self.last_input, self.last_output = x, self.encode(x, *args, **kwargs)
        return self.last_output


PROMPT_CACHE_SIZE = 4


def _prompt_embeds(pipe, prompt: str, negative_prompt: str, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """UMT5 embeddings of the prompts, kept for the last few prompts: sweeps and strength changes re-encode nothing."""
    cache: OrderedDict = pipe.__dict__.setdefault("_studio_prompts", OrderedDict())
    key = (prompt, negative_prompt if guided else None)
    if key not in cache:
        cache[key] = pipe.encode_prompt(prompt, negative_prompt if guided else None,
                                        do_classifier_free_guidance=guided, max_sequence_length=512,
                                        device=pipe._execution_device)
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def generate(pipe, request: GenerationRequest, *, on_progress: ProgressFn | None = None,
             should_stop: StopFn | None = None) -> Generated:
    """Render one video into memory. Raises GenerationCancelled when `should_stop()` turns true."""
    progress = on_progress or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    image = open_image(request.image)
    resolved, notes = resolve_request(request, image.size)
    for note in notes:
        progress(0.0, note)
    loras = apply_loras(pipe, resolved.loras)
    set_scheduler(pipe, resolved.scheduler, resolved.flow_shift)
    if not isinstance(pipe.vae.encode, _RepeatedEncode):
        pipe.vae.encode = _RepeatedEncode(pipe.vae.encode)
    conditioning = prepare_image(image, resolved.height, resolved.width)

    def on_step(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        progress(0.9 * (step + 1) / resolved.steps, f"step {step + 1}/{resolved.steps}")
        if stop():
            pipeline._interrupt = True
        return {}

    started = time.perf_counter()
    progress(0.0, f"step 0/{resolved.steps}")
    # The LCM scheduler draws fresh noise at each step from the global generator (the pipeline passes it none):
    # seeded here, and the caller's random state left as it was.
    with torch.inference_mode(), torch.random.fork_rng(devices=[pipe._execution_device] if
                                                      pipe._execution_device.type == "cuda" else []):
        torch.manual_seed(resolved.seed)
        positive, negative = _prompt_embeds(pipe, resolved.prompt, resolved.negative_prompt, resolved.guidance > 1)
        latents = pipe(
            image=conditioning, prompt_embeds=positive, negative_prompt_embeds=negative,
            height=resolved.height, width=resolved.width, num_frames=resolved.frames,
            num_inference_steps=resolved.steps, guidance_scale=resolved.guidance,
            generator=torch.Generator("cpu").manual_seed(resolved.seed), output_type="latent",
            callback_on_step_end=on_step,
        ).frames
        if pipe.interrupt or stop():
            pipe.maybe_free_model_hooks()
            raise GenerationCancelled("Generation stopped; nothing was written.")
        progress(0.92, "decoding video")
        frames = _decode_latents(pipe, latents, resolved.decode_bf16)
        pipe.maybe_free_model_hooks()
    return Generated(frames=frames, request=resolved, notes=notes, loras=loras,
                     seconds=time.perf_counter() - started, image_size=image.size)


def motion_readout(sidecar: dict) -> str:
    """A video's motion with its unit, from its sidecar. Sidecars written before the unit was recorded measured
    pixels per frame at full size, which cannot be converted afterwards: they say so."""
    if "motion" not in sidecar:
        return "not recorded"
    unit = sidecar.get("motion_unit", "px/frame (an older measure: render again to compare)")
    return f"{sidecar['motion']:.2f} {MOTION_UNIT_SHORT if unit == MOTION_UNIT else unit}"


def frames_sha256(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


def sidecar_path(video: str | Path) -> Path:
    return Path(video).with_suffix(".json")


def _scheduler_record(pipe) -> dict:
    """The scheduler's class and settings (flow shift, UniPC variant...): the model folder decides them, and they
    shape every frame."""
    config = {key: value for key, value in pipe.scheduler.config.items() if not key.startswith("_")}
    return {"class": type(pipe.scheduler).__name__, **config}


def _pipeline_facts(pipe) -> dict:
    import diffusers

    facts = {"diffusers": diffusers.__version__, "torch": torch.__version__,
             "dtype": str(pipe.transformer.dtype).replace("torch.", ""), "device": str(pipe._execution_device),
             "scheduler": _scheduler_record(pipe)}
    if pipe.config.get("boundary_ratio") is not None:  # Wan 2.2: where the low-noise expert takes over
        facts["boundary_ratio"] = float(pipe.config.boundary_ratio)
    facts.update(pipe.__dict__.get("_studio_memory", {}))
    return facts


def _model_source(model: str) -> str:
    """A local model folder as an absolute path (a relative one breaks reproducing from elsewhere); hub ids as is."""
    return str(Path(model).resolve()) if model and Path(model).exists() else model


def write_outputs(pipe, generated: Generated, out_path: str | Path, *, model: str | None = None,
                  extra: dict | None = None) -> Path:
    """Write the mp4 and its JSON sidecar (atomically); returns the mp4 path."""
    out_path = Path(out_path)
    write_video(generated.frames, out_path, fps=generated.request.fps)
    request = asdict(generated.request)
    request["loras"] = [list(pair) for pair in generated.request.loras]
    sidecar = {
        "studio_sidecar": SIDECAR_VERSION,
        "video": out_path.name,
        "created": datetime.now().isoformat(timespec="seconds"),
        "model": _model_source(str(model or pipe.name_or_path or "")),
        "request": request,
        "loras": generated.loras,
        "image_sha256": file_sha256(generated.request.image),
        "image_size": list(generated.image_size),
        "adjustments": generated.notes,
        "seconds": round(generated.seconds, 3),
        "seconds_per_step": round(generated.seconds / generated.request.steps, 4),
        "motion": round(video_motion(generated.frames, generated.request.fps), 4),
        "motion_unit": MOTION_UNIT,
        "frames_sha256": frames_sha256(generated.frames),
        **_pipeline_facts(pipe),
        **(extra or {}),
    }
    atomic_write_json(sidecar_path(out_path), sidecar)
    return out_path


def render_video(pipe, request: GenerationRequest, out_path: str | Path, *, on_progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None, model: str | None = None, extra: dict | None = None,
                 draft: DraftSettings | None = None) -> Path:
    """Render `request` to `out_path` (mp4) with a `.json` sidecar of the same name; returns the mp4 path.
    With `draft`, a draft of it (see engine.generate.draft) whose sidecar says how to render it in full."""
    if draft:
        request, extra = draft_of(request, draft), {**(extra or {}), "draft": draft_record(request, draft)}
    generated = generate(pipe, request, on_progress=on_progress, should_stop=should_stop)
    path = write_outputs(pipe, generated, out_path, model=model, extra=extra)
    if on_progress:
        on_progress(1.0, f"wrote {Path(out_path).name}")
    return path


def new_output_path(out_dir: str | Path, stem: str = "gen") -> Path:
    """A fresh, sortable name in `out_dir` such as gen-20261126-011500.mp4."""
    out_dir = Path(out_dir)
    base = f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = out_dir / f"{base}.mp4", 1
    while path.exists() or sidecar_path(path).exists():
        n += 1
        path = out_dir / f"{base}-{n}.mp4"
    return path


def read_sidecar(path: str | Path) -> dict:
    path = sidecar_path(path) if Path(path).suffix.lower() != ".json" else Path(path)
    try:
        data = json.loads(read_text(path))
    except (OSError, TextFileError, json.JSONDecodeError) as err:
        raise GenerationError(f"Cannot read the settings file {path} ({err}).") from err
    if "request" not in data:
        raise GenerationError(f"{path} is not a generation sidecar (no 'request').")
    return data


def request_from_sidecar(path: str | Path) -> GenerationRequest:
    """The exact request (seed included) that made a video, from its sidecar."""
    return GenerationRequest.from_dict(read_sidecar(path)["request"])


def options_from_sidecar(path: str | Path) -> PipelineOptions:
    """The pipeline options a video was made with, its device included (a CPU render must not come back on a GPU)."""
    data = read_sidecar(path)
    return PipelineOptions(model=data["model"], device=data.get("device"),
                           cpu_offload=bool(data.get("cpu_offload", False)),
                           vae_tiling=bool(data.get("vae_tiling", False)), fast=bool(data.get("fast", False)))


def changed_inputs(sidecar: dict) -> list[str]:
    """The files a sidecar's video was made from that are gone or have other contents now (LoRAs, start image)."""
    files = [("LoRA file", entry["path"], entry.get("sha256")) for entry in sidecar.get("loras", [])]
    files.append(("start image", sidecar["request"]["image"], sidecar.get("image_sha256")))
    problems = []
    for kind, path, recorded in files:
        if not Path(path).is_file():
            problems.append(f"the {kind} {path} is gone")
        elif recorded and (now := file_sha256(path)) != recorded:
            problems.append(f"the {kind} {path} has changed since (sha256 {recorded[:12]} then, {now[:12]} now)")
    return problems


def reproduce(sidecar: str | Path, cache: PipelineCache, out_path: str | Path | None = None, *,
              on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> tuple[Path, bool]:
    """Render a video again from its sidecar; returns (new mp4, whether its frames are identical to the original)."""
    data = read_sidecar(sidecar)
    problems = changed_inputs(data)
    if problems:
        raise GenerationError(f"Cannot reproduce {data['video']}: {'; '.join(problems)}. "
                              "Put the original file back to render it again.")
    source = sidecar_path(sidecar) if Path(sidecar).suffix.lower() != ".json" else Path(sidecar)
    out_path = Path(out_path) if out_path else new_output_path(source.parent, Path(data["video"]).stem + "-again")
    pipe = cache.get(options_from_sidecar(source), on_progress=on_progress)
    path = render_video(pipe, request_from_sidecar(source), out_path, on_progress=on_progress,
                        should_stop=should_stop, model=data["model"], extra={"reproduces": data["video"]})
    return path, read_sidecar(path)["frames_sha256"] == data.get("frames_sha256")


def generate_with_cache(cache: PipelineCache, options: PipelineOptions, request: GenerationRequest,
                        out_path: str | Path, *, on_progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None) -> Path:
    """Load (or reuse) the pipeline for `options` and render one video."""
    pipe = cache.get(options, on_progress=on_progress)
    return render_video(pipe, request, out_path, on_progress=on_progress, should_stop=should_stop,
                        model=options.model)


# ---------------------------------------------------------------------------------------------- trainer samples

def sample_with_transformer(model_path: str | Path, transformers: dict, request: GenerationRequest,
                            out_path: str | Path, *, on_progress: ProgressFn | None = None,
                            should_stop: StopFn | None = None) -> Path:
    """Render a sample with the trainer's in-memory (LoRA-wrapped) transformers, {pipeline component: module}
    ('transformer', and for Wan 2.2 'transformer_2'; a component left out is loaded from the model folder).

    The VAE, text and image encoders are loaded for this call onto the transformers' device and freed afterwards;
    the transformers themselves are not moved (they may be partly in CPU memory) and get their train/eval mode back.
    """
    models = {name: t.get_base_model() if hasattr(t, "get_base_model") else t for name, t in transformers.items()}
    first = next(iter(models.values()))
    device = next(p.device for p in first.parameters() if p.device.type != "meta" and p.numel())
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    pipe = None
    try:
        pipe = load_pipeline(str(model_path), device, transformers=models)
        for component in (pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.transformer, pipe.transformer_2):
            if component is not None and component not in models.values():
                component.to(device)
        return render_video(pipe, replace(request, loras=[]), out_path, on_progress=on_progress,
                            should_stop=should_stop, model=str(model_path),
                            extra={"lora_source": "in-memory LoRA of the training run"})
    finally:
        for name, model in models.items():
            model.train(was_training[name])
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
