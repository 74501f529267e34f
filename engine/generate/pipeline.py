"""The loaded Wan I2V pipeline (kept between generations) and the LoRAs applied to it at their strengths."""

from __future__ import annotations

import gc
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.core.files import file_sha256
from engine.core.hardware import default_device
from engine.core.progress import ProgressFn
from engine.generate.lora_files import check_keys_match_model, load_lora
from engine.generate.request import GenerationError

MAX_LOADED_ADAPTERS = 6  # older adapters are deleted beyond this (an epoch sweep loads one per epoch)


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


def load_pipeline(model: str, device: torch.device, transformer=None):
    """Load the Wan I2V pipeline: bf16 transformer and text encoder on a GPU (fp32 on CPU); VAE and CLIP in fp32."""
    from engine.core.models import load_wan_image_encoder, load_wan_pipeline, load_wan_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, image_encoder = load_wan_image_encoder(model, torch.float32)
    parts = dict(vae=load_wan_vae(model, torch.float32), image_encoder=image_encoder)
    if transformer is not None:
        parts["transformer"] = transformer
    return load_wan_pipeline(model, dtype, **parts)


def _apply_fast_path(pipe, device: torch.device) -> None:
    """The one place generation switches on engine/accel.py's speed-ups (owned by the performance work)."""
    from engine.speed.inference import prepare_pipeline_for_inference

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
