"""Image-to-video generation with Wan 2.1 I2V and LoRAs at adjustable strengths; sweeps, comparisons, reproduction.

The pipeline stays loaded between generations (`PipelineCache`), each LoRA file is loaded once as a named peft
adapter, and strengths change through `set_adapters`, so trying another strength never reloads the 14B model.
Every video gets a JSON sidecar of the same name holding every parameter (seed included) and a hash of its frames,
so `reproduce(sidecar)` can render it again and say whether it came out identical.

Command line (the reference workflow's strength-test script):
    python -m engine.infer --model PATH --image IMG --prompt TEXT [--lora FILE --strength S]...
                           [--strengths 0,0.5,1] [--frames N --steps N --guidance G --seed N --height H --width W]
                           --out DIR
    python -m engine.infer --reproduce outputs/gen-....json [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.ffmpeg import write_video
from engine.files import atomic_write_json
from engine.lora_io import check_keys_match_model, load_lora

# Wan's usual negative prompt (the one its authors ship as the default), in the original Chinese.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
PIXEL_BUDGET_480P = 832 * 480
SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2
STRENGTH_MIN, STRENGTH_MAX = -1.0, 2.0
DEFAULT_SWEEP_STRENGTHS = (0.0, 0.5, 1.0, 1.5)
MAX_LOADED_ADAPTERS = 6  # older adapters are deleted beyond this (an epoch sweep loads one per epoch)
MAX_IMAGE_SIDE = 4096  # bigger inputs are scaled down first: the model sees about 832x480 anyway
SIDECAR_VERSION = 1

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]


class GenerationError(ValueError):
    """A request that cannot be rendered as given: which parameter or file, and what to do."""


class GenerationCancelled(RuntimeError):
    """The person pressed stop; nothing was written."""


# ---------------------------------------------------------------------------------------------- the request

@dataclass
class GenerationRequest:
    """Everything that decides a video. `seed`, `height`, `width` left as None are chosen and recorded."""

    image: str
    prompt: str
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    seed: int | None = None  # None or negative: a random seed, written to the sidecar
    steps: int = 30  # denoising steps, 1-200
    guidance: float = 5.0  # classifier-free guidance scale; <= 1 turns guidance off (one pass per step)
    frames: int = 81  # 4k+1 (81 = 5.06 s at 16 fps); other counts are adjusted
    height: int | None = None  # None: from the image's aspect at `pixel_budget`, multiples of 16
    width: int | None = None
    pixel_budget: int = PIXEL_BUDGET_480P  # width x height aimed at when the size comes from the image
    fps: float = 16.0  # Wan's native rate
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, strength -1..2), stacked

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = [(str(p), float(s)) for p, s in values.get("loras", [])]
        return cls(**values)


def _multiple_of_16(value: float) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def fit_size(image_width: int, image_height: int, pixel_budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """(height, width) with the image's aspect and about `pixel_budget` pixels, both multiples of 16."""
    scale = math.sqrt(pixel_budget / (image_width * image_height))
    return _multiple_of_16(image_height * scale), _multiple_of_16(image_width * scale)


def output_size(image_size: tuple[int, int], height: int | None = None, width: int | None = None,
                pixel_budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """(height, width) to render, multiples of 16. A side left empty (None or 0) follows the image's aspect from
    the side given, so giving only a width never crops a landscape image to a portrait; none given: `fit_size`."""
    image_width, image_height = image_size
    if not height and not width:
        return fit_size(image_width, image_height, pixel_budget)
    width = _multiple_of_16(width or height * image_width / image_height)
    height = _multiple_of_16(height or width * image_height / image_width)
    return height, width


def nearest_valid_frames(frames: int) -> int:
    """The nearest 4k+1 frame count (at least 5): the VAE packs 4 frames per latent after the first."""
    return max(5, 4 * round((frames - 1) / 4) + 1)


def open_image(path: str | Path):
    """Open an image as RGB with its EXIF rotation applied; transparency is flattened onto white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"Image not found: {path}.")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.width * img.height > MAX_IMAGE_SIDE * MAX_IMAGE_SIDE:
                img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # shrink before the mode conversion: less memory
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")  # 16-bit greyscale down to 8 bits
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise GenerationError(f"{path.name} is too large to open safely ({err}). Scale it down first.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise GenerationError(f"{path.name} is not a readable image ({err}). Use a PNG, JPEG or WebP file.") from err


def prepare_image(image, height: int, width: int):
    """Scale the image to cover height x width and crop the centre, so nothing is stretched."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def resolve_request(request: GenerationRequest, image_size: tuple[int, int]) -> tuple[GenerationRequest, list[str]]:
    """Check every parameter; return the request with seed, size and frames made concrete, and notes on changes."""
    notes: list[str] = []
    if request.prompt is None:
        raise GenerationError("prompt is missing: describe the motion you want (it may be empty text).")
    if not 1 <= int(request.steps) <= 200:
        raise GenerationError(f"steps must be between 1 and 200, not {request.steps}.")
    if not 0 <= float(request.guidance) <= 30:
        raise GenerationError(f"guidance must be between 0 and 30 (5 is usual), not {request.guidance}.")
    if not float(request.fps) > 0:
        raise GenerationError(f"fps must be positive, not {request.fps}.")
    frames = int(request.frames)
    if frames < 1:
        raise GenerationError(f"frames must be at least 1, not {frames}.")
    if (frames - 1) % 4 or frames < 5:
        adjusted = nearest_valid_frames(frames)
        notes.append(f"frames {frames} is not 4k+1 (the VAE packs 4 frames per latent); using {adjusted}.")
        frames = adjusted
    loras = []
    for path, strength in request.loras:
        strength = float(strength)
        if not STRENGTH_MIN <= strength <= STRENGTH_MAX:
            raise GenerationError(f"LoRA strength {strength} for {Path(path).name} is outside "
                                  f"{STRENGTH_MIN:g}..{STRENGTH_MAX:g}.")
        if not Path(path).exists():
            raise GenerationError(f"LoRA file not found: {path}.")
        loras.append((str(Path(path).resolve()), strength))
    for name, value in (("height", request.height), ("width", request.width)):
        if value and int(value) < SIZE_MULTIPLE:
            raise GenerationError(f"{name} must be at least {SIZE_MULTIPLE} pixels (or 0: from the image), "
                                  f"not {value}.")
    height, width = output_size(image_size, request.height, request.width, request.pixel_budget)
    uneven = [f"{name} {value}" for name, value, used in (("width", request.width, width),
                                                          ("height", request.height, height))
              if value and int(value) != used]
    if uneven:
        notes.append(f"{', '.join(uneven)}: not a multiple of 16; using {width}x{height}.")
    seed = request.seed
    if seed is None or int(seed) < 0:
        seed = secrets.randbelow(2**31)
    return replace(request, image=str(Path(request.image).resolve()), seed=int(seed), frames=frames,
                   height=int(height), width=int(width), steps=int(request.steps), loras=loras), notes


# ---------------------------------------------------------------------------------------------- pipeline + LoRAs

@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline is loaded and run. Changing `model`, `device` or `fast` reloads; the rest does not."""

    model: str
    device: str | None = None  # None: cuda when available, else cpu
    cpu_offload: bool = False  # diffusers model CPU offload: each component moves to the GPU only while it runs
    vae_tiling: bool = False  # decode the video in tiles: less memory at 480p, slightly slower
    fast: bool = False  # the speed-ups of engine/accel.py, applied once when the pipeline is loaded


def memory_advice(options: PipelineOptions, names: dict[str, str]) -> str:
    """What to change after the GPU ran out of memory, each setting named as `names` says (the tab's labels, the
    command line's flags): the memory savers still off, then fewer frames or a smaller size."""
    off = [names[key] for key in ("cpu_offload", "vae_tiling") if not getattr(options, key)]
    savers = f"turn on {' and '.join(off)}, or " if off else ""
    return f"The GPU ran out of memory: {savers}use fewer {names['frames']} or a smaller {names['size']}."


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str, device: torch.device, transformer=None):
    """Load the Wan I2V pipeline: bf16 transformer and text encoder on a GPU (fp32 on CPU); VAE and CLIP in fp32."""
    from engine.models import load_wan_image_encoder, load_wan_pipeline, load_wan_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, image_encoder = load_wan_image_encoder(model, torch.float32)
    parts = dict(vae=load_wan_vae(model, torch.float32), image_encoder=image_encoder)
    if transformer is not None:
        parts["transformer"] = transformer
    return load_wan_pipeline(model, dtype, **parts)


def _apply_fast_path(pipe, device: torch.device) -> None:
    """The one place generation switches on engine/accel.py's speed-ups (owned by the performance work)."""
    from engine.accel import prepare_pipeline_for_inference

    prepare_pipeline_for_inference(pipe, device=device)


class PipelineCache:
    """Keeps one pipeline loaded between generations; `unload()` frees it. Not thread-safe: hold the GPU lock."""

    def __init__(self) -> None:
        self.pipe = None
        self.options: PipelineOptions | None = None
        self.device: torch.device | None = None
        self._offloaded = False  # diffusers' model CPU offload hooks are on
        self._placed = False  # every component sits on self.device

    def get(self, options: PipelineOptions, on_progress: ProgressFn | None = None):
        device = torch.device(options.device) if options.device else default_device()
        same = self.options is not None and (self.options.model, self.device, self.options.fast) == (
            options.model, device, options.fast)
        if not same:
            self.unload()
            if on_progress:
                on_progress(0.0, f"loading {options.model}")
            self.pipe = load_pipeline(options.model, device)
            if options.fast:
                _apply_fast_path(self.pipe, device)
            self.device = device
        self._apply_memory_modes(options, device)
        self.options = options
        # Sidecars record the memory modes the video was made with.
        self.pipe.__dict__["_studio_memory"] = {"cpu_offload": self._offloaded, "vae_tiling": options.vae_tiling,
                                                "fast": options.fast}
        return self.pipe

    def _apply_memory_modes(self, options: PipelineOptions, device: torch.device) -> None:
        if options.vae_tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        want_offload = options.cpu_offload and device.type != "cpu"  # on a CPU there is nothing to offload to
        if want_offload and not self._offloaded:
            self.pipe.enable_model_cpu_offload(device=device)  # from CPU memory: a 24 GB card never holds it all
        elif not want_offload and (self._offloaded or not self._placed):
            if self._offloaded:
                self.pipe.remove_all_hooks()
            self.pipe.to(device)
        self._offloaded, self._placed = want_offload, not want_offload

    def describe(self) -> str:
        if self.pipe is None:
            return "no model loaded"
        adapters = len(getattr(self.pipe, "_studio_adapters", {}))
        return (f"{self.options.model} on {self.device}" + (" (CPU offload)" if self._offloaded else "")
                + (f", {adapters} LoRA(s) loaded" if adapters else ""))

    def unload(self) -> None:
        """Free the pipeline (and its GPU memory)."""
        if self.pipe is not None:
            if self._offloaded:
                self.pipe.remove_all_hooks()
            self.pipe = None
        self.options, self.device, self._offloaded, self._placed = None, None, False, False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, mtime, size): LoRA files are hashed once per version."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def apply_loras(pipe, loras: Sequence[tuple[str, float]]) -> list[dict]:
    """Make exactly `loras` active at their strengths: each file is loaded once as a named adapter, then only
    `set_adapters` runs. Returns what was applied (file, strength, sha256, format, rank) for the sidecar."""
    registry: OrderedDict[tuple, str] = pipe.__dict__.setdefault("_studio_adapters", OrderedDict())
    active, applied = [], []
    for path, strength in loras:
        path = Path(path).resolve()
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)  # a re-saved file at the same path is loaded again
        if key not in registry:
            weights = load_lora(path)
            check_keys_match_model(weights, pipe.transformer)
            name = "lora_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            pipe.load_lora_weights(weights.to_diffusers_peft(), adapter_name=name)
            registry[key] = name
            _remember_format(pipe, name, weights.source_format, weights.rank)
        registry.move_to_end(key)
        if strength != 0:  # a LoRA at 0 is left out: the base output exactly, without its extra matmuls
            active.append((registry[key], float(strength)))
        info = pipe.__dict__["_studio_adapter_info"][registry[key]]
        applied.append({"path": str(path), "strength": float(strength), "sha256": file_sha256(path), **info})
    _evict_adapters(pipe, registry, keep={name for name, _ in active})
    if active:
        pipe.enable_lora()
        names = [n for n, _ in active]
        if len(set(names)) != len(names):
            raise GenerationError("The same LoRA file is stacked twice; give it once with the summed strength.")
        pipe.set_adapters(names, [s for _, s in active])
    elif registry:
        pipe.disable_lora()
    return applied


def _remember_format(pipe, name: str, source_format: str, rank: int) -> None:
    pipe.__dict__.setdefault("_studio_adapter_info", {})[name] = {"format": source_format, "rank": rank}


def _evict_adapters(pipe, registry: OrderedDict, keep: set[str]) -> None:
    while len(registry) > MAX_LOADED_ADAPTERS:
        for key, name in registry.items():
            if name not in keep:
                pipe.delete_adapters(name)
                del registry[key]
                break
        else:
            return


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


def _decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents -> uint8 frames, as the pipeline does (done here so a cancel skips the VAE entirely)."""
    vae = pipe.vae
    latents = latents.to(device=pipe._execution_device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


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
    conditioning = prepare_image(image, resolved.height, resolved.width)

    def on_step(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        progress(0.9 * (step + 1) / resolved.steps, f"step {step + 1}/{resolved.steps}")
        if stop():
            pipeline._interrupt = True
        return {}

    started = time.perf_counter()
    progress(0.0, f"step 0/{resolved.steps}")
    with torch.inference_mode():
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
        frames = _decode_latents(pipe, latents)
        pipe.maybe_free_model_hooks()
    return Generated(frames=frames, request=resolved, notes=notes, loras=loras,
                     seconds=time.perf_counter() - started, image_size=image.size)


def motion_score(frames: np.ndarray) -> float:
    """Mean optical-flow magnitude (pixels per frame, OpenCV Farneback) over consecutive frames: how much moves."""
    import cv2

    if len(frames) < 2:
        return 0.0
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    magnitudes = []
    for previous, current in zip(grey, grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
    return float(np.mean(magnitudes))


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
        "motion": round(motion_score(generated.frames), 4),
        "frames_sha256": frames_sha256(generated.frames),
        **_pipeline_facts(pipe),
        **(extra or {}),
    }
    atomic_write_json(sidecar_path(out_path), sidecar)
    return out_path


def render_video(pipe, request: GenerationRequest, out_path: str | Path, *, on_progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None, model: str | None = None, extra: dict | None = None) -> Path:
    """Render `request` to `out_path` (mp4) with a `.json` sidecar of the same name; returns the mp4 path."""
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
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


# ---------------------------------------------------------------------------------------------- sweeps

@dataclass
class SweepResult:
    videos: list[Path]
    labels: list[str]
    motion: list[float]
    comparison: Path  # all variants side by side with labels, one mp4 (+ .json listing them)


def plan_sweep(request: GenerationRequest, strengths: Sequence[float] | None = None,
               lora_files: Sequence[str | Path] | None = None) -> list[tuple[str, GenerationRequest]]:
    """(label, request) for each variant: the first LoRA at each strength and/or swapped for each epoch's file.

    Other stacked LoRAs keep their strengths. Strength 0 is the same video for every file, so it is rendered once.
    """
    if not request.loras and not lora_files:
        raise GenerationError("A sweep needs a LoRA: choose one (or several epochs) first.")
    first_path, first_strength = request.loras[0] if request.loras else (str(lora_files[0]), 1.0)
    rest = list(request.loras[1:])
    files = [str(f) for f in lora_files] if lora_files else [first_path]
    values = [float(s) for s in strengths] if strengths else [first_strength]
    variants, seen_zero = [], False
    for file in files:
        for strength in values:
            if strength == 0:
                if seen_zero:
                    continue
                seen_zero = True
                label = "strength 0 (base)"
            else:
                label = f"{lora_label(file)} @ {strength:g}" if len(files) > 1 else f"strength {strength:g}"
            variants.append((label, replace(request, loras=[(file, strength), *rest])))
    return variants


def lora_label(path: str | Path) -> str:
    """A short name: the epoch folder for a run's adapter_model.safetensors, else the file's stem."""
    path = Path(path)
    return path.parent.name if path.name == "adapter_model.safetensors" else path.stem


def render_sweep(pipe, request: GenerationRequest, out_dir: str | Path, *, strengths: Sequence[float] | None = None,
                 lora_files: Sequence[str | Path] | None = None, name: str | None = None, model: str | None = None,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> SweepResult:
    """Render every variant with the same seed, then one side-by-side comparison video of them all."""
    progress = on_progress or (lambda fraction, message: None)
    variants = plan_sweep(request, strengths, lora_files)
    if request.seed is None or request.seed < 0:
        request = replace(request, seed=secrets.randbelow(2**31))  # one seed for every variant
        variants = [(label, replace(r, seed=request.seed)) for label, r in variants]
    base = new_output_path(out_dir, name or "sweep")
    videos, labels, motion, clips = [], [], [], []
    for i, (label, variant) in enumerate(variants):
        def part(fraction: float, message: str, i=i, label=label) -> None:
            progress((i + fraction) / (len(variants) + 0.2), f"[{i + 1}/{len(variants)} {label}] {message}")

        generated = generate(pipe, variant, on_progress=part, should_stop=should_stop)
        path = base.with_name(f"{base.stem}-{i + 1:02d}-{_slug(label)}.mp4")
        write_outputs(pipe, generated, path, model=model, extra={"sweep": base.stem, "label": label})
        videos.append(path)
        labels.append(label)
        motion.append(read_sidecar(path)["motion"])
        clips.append(generated.frames)
    progress(len(variants) / (len(variants) + 0.2), "combining the comparison video")
    comparison = combine_side_by_side(clips, [f"{lab}  motion {m:.2f}" for lab, m in zip(labels, motion)],
                                      base, fps=request.fps)
    atomic_write_json(sidecar_path(comparison), {
        "studio_sweep": SIDECAR_VERSION, "video": comparison.name, "seed": variants[0][1].seed,
        "variants": [{"label": lab, "video": v.name, "motion": m} for lab, v, m in zip(labels, videos, motion)],
    })
    progress(1.0, f"wrote {comparison.name}")
    return SweepResult(videos=videos, labels=labels, motion=motion, comparison=comparison)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")[:40]


def combine_side_by_side(clips: Sequence[np.ndarray], labels: Sequence[str], out_path: str | Path,
                         fps: float = 16.0, columns: int = 4) -> Path:
    """Tile equally sized clips in a grid (up to `columns` across), each under a label band; writes one mp4."""
    import cv2

    if not clips:
        raise ValueError("combine_side_by_side got no clips")
    frames, height, width = max(len(c) for c in clips), clips[0].shape[1], clips[0].shape[2]
    band = 24 if width >= 160 else 16
    cols = min(columns, len(clips))
    rows = math.ceil(len(clips) / cols)
    canvas = np.zeros((frames, rows * (height + band), cols * width, 3), dtype=np.uint8)
    for i, (clip, label) in enumerate(zip(clips, labels)):
        if clip.shape[1:3] != (height, width):
            clip = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in clip])
        y, x = (i // cols) * (height + band), (i % cols) * width
        title = np.zeros((band, width, 3), dtype=np.uint8)
        scale = min(0.5, max(0.25, width / 900))
        cv2.putText(title, label, (4, band - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        for t in range(frames):
            canvas[t, y:y + band, x:x + width] = title
            canvas[t, y + band:y + band + height, x:x + width] = clip[min(t, len(clip) - 1)]
    return write_video(canvas, out_path, fps=fps)


# ---------------------------------------------------------------------------------------------- trainer samples

def sample_with_transformer(model_path: str | Path, transformer, request: GenerationRequest, out_path: str | Path,
                            *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> Path:
    """Render a sample with the trainer's in-memory (LoRA-wrapped) transformer.

    The VAE, text and image encoders are loaded for this call onto the transformer's device and freed afterwards;
    the transformer itself is not moved (it may be partly in CPU memory) and gets its train/eval mode back.
    """
    model = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    pipe = None
    try:
        pipe = load_pipeline(str(model_path), device, transformer=model)
        for component in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
            component.to(device)
        return render_video(pipe, replace(request, loras=[]), out_path, on_progress=on_progress,
                            should_stop=should_stop, model=str(model_path),
                            extra={"lora_source": "in-memory LoRA of the training run"})
    finally:
        model.train(was_training)
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- ComfyUI export

@dataclass(frozen=True)
class ComfyModelFiles:
    """File names inside ComfyUI's models/ folders (the Comfy-Org repackaged Wan 2.1 names by default)."""

    diffusion_model: str = "wan2.1_i2v_480p_14B_bf16.safetensors"
    text_encoder: str = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    clip_vision: str = "clip_vision_h.safetensors"
    vae: str = "wan_2.1_vae.safetensors"


# The scheduler Wan2.1-I2V-14B-480P-Diffusers ships (UniPC, flow shift 3, variant bh2): for sidecars that predate
# the scheduler record.
WAN_480P_SCHEDULER = {"class": "UniPCMultistepScheduler", "flow_shift": 3.0, "solver_type": "bh2"}


def comfy_lora_name(path: str | Path) -> str:
    """The name to copy a LoRA under in ComfyUI/models/loras: runs/<run>/epoch3/adapter_model.safetensors ->
    <run>_epoch3.safetensors (so epochs do not overwrite each other)."""
    path = Path(path)
    if path.name == "adapter_model.safetensors":
        return f"{path.parent.parent.name}_{path.parent.name}.safetensors"
    return path.name


def comfyui_workflow(request: GenerationRequest, files: ComfyModelFiles = ComfyModelFiles(),
                     scheduler: dict | None = None) -> dict:
    """An API-format ComfyUI workflow (node id -> {class_type, inputs}) for the same image, prompt, LoRAs at the
    same strengths, size, frames, steps, guidance, seed and sampling (`scheduler`: a sidecar's record of the
    diffusers scheduler). ComfyUI draws its noise differently, so the video is alike in settings, not identical
    in pixels."""
    scheduler = scheduler or WAN_480P_SCHEDULER
    if scheduler.get("class") != "UniPCMultistepScheduler":
        raise GenerationError(f"ComfyUI export knows Wan's flow UniPC scheduler only; this video used "
                              f"{scheduler.get('class')}.")
    nodes: dict[str, dict] = {}

    def add(class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            nodes[node_id]["_meta"] = {"title": title}
        return node_id

    unet = add("UNETLoader", unet_name=files.diffusion_model, weight_dtype="default")
    model = [unet, 0]
    for path, strength in request.loras:
        name = comfy_lora_name(path)
        model = [add("LoraLoaderModelOnly", title=f"LoRA: copy {path} to models/loras/{name}", model=model,
                     lora_name=name, strength_model=float(strength)), 0]
    # ModelSamplingSD3 shifts sigmas as diffusers' flow_shift does: s*t / (1 + (s-1)*t).
    model = [add("ModelSamplingSD3", model=model, shift=float(scheduler["flow_shift"])), 0]
    clip = add("CLIPLoader", clip_name=files.text_encoder, type="wan", device="default")
    positive = add("CLIPTextEncode", clip=[clip, 0], text=request.prompt)
    negative = add("CLIPTextEncode", clip=[clip, 0], text=request.negative_prompt)
    vae = add("VAELoader", vae_name=files.vae)
    image = add("LoadImage", title=f"Start image: copy {request.image} to ComfyUI's input folder",
                image=Path(request.image).name)
    vision = add("CLIPVisionLoader", clip_name=files.clip_vision)
    # diffusers' CLIPImageProcessor (as Wan's own code) resizes the short side and crops the centre; "none" would
    # squash the whole frame into the square instead.
    vision_out = add("CLIPVisionEncode", clip_vision=[vision, 0], image=[image, 0], crop="center")
    i2v = add("WanImageToVideo", positive=[positive, 0], negative=[negative, 0], vae=[vae, 0],
              clip_vision_output=[vision_out, 0], start_image=[image, 0], width=request.width,
              height=request.height, length=request.frames, batch_size=1)
    # diffusers skips guidance at <= 1 (the prompt alone), which is cfg 1 in ComfyUI; its cfg 0 would be the
    # negative prompt alone. ComfyUI's "uni_pc" is UniPC's bh1 variant, "uni_pc_bh2" the bh2 one.
    sampler = add("KSampler", model=model, positive=[i2v, 0], negative=[i2v, 1], latent_image=[i2v, 2],
                  seed=int(request.seed or 0), steps=request.steps, cfg=max(float(request.guidance), 1.0),
                  sampler_name="uni_pc_bh2" if scheduler["solver_type"] == "bh2" else "uni_pc",
                  scheduler="simple", denoise=1.0)
    decoded = add("VAEDecode", samples=[sampler, 0], vae=[vae, 0])
    video = add("CreateVideo", images=[decoded, 0], fps=request.fps)
    add("SaveVideo", video=[video, 0], filename_prefix="video/wan_lora_studio", format="auto", codec="auto")
    return nodes


def export_comfyui_workflow(sidecar: str | Path, out_path: str | Path | None = None,
                            files: ComfyModelFiles = ComfyModelFiles()) -> Path:
    """Write the ComfyUI workflow of a generated video (from its sidecar) beside it as <video>.comfyui.json."""
    source = sidecar_path(sidecar) if Path(sidecar).suffix.lower() != ".json" else Path(sidecar)
    data = read_sidecar(source)
    out_path = Path(out_path) if out_path else source.with_name(source.stem + ".comfyui.json")
    workflow = comfyui_workflow(GenerationRequest.from_dict(data["request"]), files, data.get("scheduler"))
    return atomic_write_json(out_path, workflow)


# ---------------------------------------------------------------------------------------------- command line

def _parse_strengths(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--strengths takes numbers separated by commas, not {text!r}") from err


def _reproduce_cli(sidecar: Path, out_dir: Path | None) -> int:
    try:
        data = read_sidecar(sidecar)
        out_path = new_output_path(out_dir, Path(data["video"]).stem + "-again") if out_dir else None
        path, identical = reproduce(sidecar, PipelineCache(), out_path,
                                    on_progress=lambda f, m: print(f"[{f * 100:5.1f}%] {m}", file=sys.stderr))
    except (GenerationError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}\t{'identical frames' if identical else 'frames differ (another device or library version?)'}")
    return 0


CLI_SETTING_NAMES = {"cpu_offload": "--cpu-offload", "vae_tiling": "--vae-tiling", "frames": "--frames",
                     "size": "--height/--width"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.infer", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Wan 2.1 I2V diffusers folder or hub id")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--prompt")
    parser.add_argument("--reproduce", type=Path, metavar="SIDECAR",
                        help="render a video again from its .json sidecar (nothing else needed)")
    parser.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    parser.add_argument("--lora", action="append", default=[], type=Path, help="LoRA file (repeat to stack)")
    parser.add_argument("--strength", action="append", default=[], type=float,
                        help="strength of the matching --lora, -1..2 (default 1)")
    parser.add_argument("--strengths", type=_parse_strengths,
                        help="sweep the first LoRA over these strengths, e.g. 0,0.5,1,1.5")
    parser.add_argument("--epochs", nargs="+", type=Path, default=None,
                        help="sweep over these LoRA files (e.g. runs/r/epoch*/adapter_model.safetensors)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None, help="default: random (written to the sidecar)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--cpu-offload", action="store_true", help="model CPU offload (for 24 GB cards)")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--fast", action="store_true", help="speed-ups from engine/accel.py")
    parser.add_argument("--device", default=None)
    parser.add_argument("--comfyui", action="store_true", help="also write each video's ComfyUI workflow")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.reproduce:
        return _reproduce_cli(args.reproduce, args.out)
    missing = [f"--{name}" for name in ("model", "image", "prompt", "out") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if len(args.strength) > len(args.lora):
        parser.error("more --strength values than --lora files")
    loras = [(str(f), args.strength[i] if i < len(args.strength) else 1.0) for i, f in enumerate(args.lora)]
    request = GenerationRequest(
        image=str(args.image), prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps, guidance=args.guidance, frames=args.frames, height=args.height, width=args.width,
        fps=args.fps, loras=loras)
    options = PipelineOptions(model=args.model, device=args.device, cpu_offload=args.cpu_offload,
                              vae_tiling=args.vae_tiling, fast=args.fast)

    def report(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    from engine.lora_io import LoraFileError, LoraMismatchError
    from engine.models import ModelFolderError

    cache = PipelineCache()
    try:
        pipe = cache.get(options, on_progress=report)
        if args.strengths or args.epochs:
            result = render_sweep(pipe, request, args.out, strengths=args.strengths, lora_files=args.epochs,
                                  model=args.model, on_progress=report)
            videos = result.videos
            for label, video, motion in zip(result.labels, result.videos, result.motion):
                print(f"{video}\t{label}\tmotion {motion:.3f}")
            print(result.comparison)
        else:
            videos = [render_video(pipe, request, new_output_path(args.out), on_progress=report, model=args.model)]
            print(videos[0])
        if args.comfyui:
            for video in videos:
                print(export_comfyui_workflow(video))
    except (GenerationError, LoraFileError, LoraMismatchError, ModelFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (GenerationCancelled, KeyboardInterrupt):
        print("stopped", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if "out of memory" not in str(err).lower():
            raise
        print(f"error: {memory_advice(options, CLI_SETTING_NAMES)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
