"""The loaded Wan I2V pipeline (kept between generations) and the LoRAs applied to it at their strengths."""

from __future__ import annotations

import gc
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.core.families import Wan22I2V
from engine.core.files import file_sha256
from engine.core.hardware import default_device
from engine.core.progress import ProgressFn
from engine.generate.lora_files import check_keys_match_model, load_lora, resolve_lora_file
from engine.generate.request import SCHEDULERS, GenerationError

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


def load_pipeline(model: str, device: torch.device, transformers: dict | None = None):
    """Load the Wan I2V pipeline (Wan 2.1, or Wan 2.2 with its two experts): bf16 transformers and text encoder on a
    GPU (fp32 on CPU); VAE and CLIP (Wan 2.1) in fp32. `transformers` replaces components ({'transformer': m})."""
    from engine.core.models import load_wan_image_encoder, load_wan_pipeline, load_wan_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, image_encoder = load_wan_image_encoder(model, torch.float32)
    parts = dict(vae=load_wan_vae(model, torch.float32), image_encoder=image_encoder, **(transformers or {}))
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


def set_scheduler(pipe, name: str, flow_shift: float | None) -> None:
    """Sample with scheduler `name` (a key of SCHEDULERS) at `flow_shift` (None: the model folder's). The model
    folder's own scheduler settings are kept aside, so every switch starts from them."""
    import diffusers

    own = pipe.__dict__.setdefault("_studio_own_scheduler", dict(pipe.scheduler.config))
    shift = float(flow_shift or own.get("flow_shift", own.get("shift", 1.0)))
    cls = getattr(diffusers, SCHEDULERS[name])
    if name == "unipc" and own.get("_class_name") == cls.__name__:
        pipe.scheduler = cls.from_config(own, flow_shift=shift)
    elif name == "unipc":  # a model folder with another scheduler: UniPC as Wan's folders set it up
        pipe.scheduler = cls(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    else:
        pipe.scheduler = cls(num_train_timesteps=own.get("num_train_timesteps", 1000), shift=shift)


def lora_component(pipe, expert: str | None) -> str:
    """The pipeline component a LoRA entry goes into: 'transformer' (Wan 2.1, Wan 2.2's high-noise expert) or
    'transformer_2' (Wan 2.2's low-noise expert)."""
    if expert is None:
        return "transformer"
    if getattr(pipe, "transformer_2", None) is None:
        raise GenerationError(f"A LoRA is marked for the {expert} expert, but the loaded model has one transformer "
                              "(Wan 2.1): load a Wan 2.2 I2V A14B folder, or use the LoRA without an expert.")
    return Wan22I2V.expert(expert).subfolder


def apply_loras(pipe, loras: Sequence[tuple]) -> list[dict]:
    """Make exactly `loras` ((file, strength[, expert]) entries) active at their strengths, each in its expert's
    transformer (Wan 2.2: 'high_noise' -> transformer, 'low_noise' -> transformer_2): each file is loaded once per
    transformer as a named adapter, then only `set_adapters` runs. A file may also be an epoch folder. Accelerator
    LoRAs' bias and norm diffs (which peft has no place for) are set on the parameters themselves, p = p0 + sum of
    strength * diff over the active LoRAs, as ComfyUI applies them. Returns what was applied (file, strength,
    expert, sha256, format, rank) for the sidecar."""
    registry: OrderedDict[tuple, str] = pipe.__dict__.setdefault("_studio_adapters", OrderedDict())
    active, applied = [], []
    for path, strength, *expert in loras:
        expert = expert[0] if expert else None
        component = lora_component(pipe, expert)
        path = resolve_lora_file(path).resolve()
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, component)  # a re-saved file at the same path loads again
        if key not in registry:
            weights = load_lora(path)
            check_keys_match_model(weights, getattr(pipe, component))
            name = "lora_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            if weights.modules:  # diffusers' own switch for Wan 2.2's second transformer (loaders/lora_pipeline.py)
                pipe.load_lora_weights(weights.to_diffusers_peft(), adapter_name=name,
                                       load_into_transformer_2=component == "transformer_2")
            registry[key] = name
            _remember(pipe, name, weights, component)
        registry.move_to_end(key)
        if strength != 0:  # a LoRA at 0 is left out: the base output exactly, without its extra matmuls
            active.append((registry[key], float(strength)))
        info = pipe.__dict__["_studio_adapter_info"][registry[key]]
        applied.append({"path": str(path), "strength": float(strength), **({"expert": expert} if expert else {}),
                        "sha256": file_sha256(path), **info})
    _evict_adapters(pipe, registry, keep={name for name, _ in active})
    names = [n for n, _ in active]
    if len(set(names)) != len(names):
        raise GenerationError("The same LoRA file is stacked twice; give it once with the summed strength.")
    info = pipe.__dict__.setdefault("_studio_adapter_info", {})
    for component in ("transformer", "transformer_2"):
        model = getattr(pipe, component, None)
        with_modules = [(n, s) for n, s in active if info[n]["modules"] and info[n]["component"] == component]
        if with_modules:
            model.enable_lora()
            model.set_adapters([n for n, _ in with_modules], [s for _, s in with_modules])
        elif any(key[3] == component and info[name]["modules"] for key, name in registry.items()):
            model.disable_lora()  # only adapters loaded here: a trainer's own LoRA (samples) stays on
    _set_diffs(pipe, active)
    return applied


def _remember(pipe, name: str, weights, component: str) -> None:
    pipe.__dict__.setdefault("_studio_adapter_info", {})[name] = {
        "format": weights.source_format, "rank": weights.rank, "modules": len(weights.modules),
        "diffs": len(weights.diffs), "component": component}
    diffs = {path: diff.detach().float().cpu() for path, diff in weights.diffs.items()}
    pipe.__dict__.setdefault("_studio_diffs", {})[name] = diffs


def _parameter(transformer, path: str) -> torch.Tensor:
    module_path, attribute = path.rsplit(".", 1)
    module = transformer.get_submodule(module_path)
    return getattr(getattr(module, "base_layer", module), attribute)


def _set_diffs(pipe, active: Sequence[tuple[str, float]]) -> None:
    """Every parameter a loaded LoRA diffs: its original value plus strength * diff of each active LoRA, written in
    place (compiled blocks keep reading the same tensor), in the transformer the LoRA belongs to. Originals are kept
    on the CPU: biases and norms, small."""
    diffs: dict[str, dict[str, torch.Tensor]] = pipe.__dict__.get("_studio_diffs", {})
    info = pipe.__dict__.setdefault("_studio_adapter_info", {})
    originals: dict[tuple[str, str], torch.Tensor] = pipe.__dict__.setdefault("_studio_diff_originals", {})
    for name, adapter in diffs.items():
        component = info[name]["component"]
        for path in adapter:
            if (component, path) not in originals:
                tensor = _parameter(getattr(pipe, component), path)
                if tensor.dtype.itemsize == 1:
                    raise GenerationError(f"This LoRA changes the weight {path} directly, which the fast path keeps "
                                          "in float8; turn the fast path off to use it.")
                originals[(component, path)] = tensor.detach().float().cpu().clone()  # .cpu() of a CPU tensor is itself
    for (component, path), original in originals.items():
        value = original.clone()
        for name, strength in active:
            if info[name]["component"] == component and path in diffs.get(name, {}):
                value += strength * diffs[name][path]
        tensor = _parameter(getattr(pipe, component), path)
        with torch.no_grad():
            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))


def _evict_adapters(pipe, registry: OrderedDict, keep: set[str]) -> None:
    while len(registry) > MAX_LOADED_ADAPTERS:
        for key, name in registry.items():
            if name not in keep:
                info = pipe.__dict__["_studio_adapter_info"].pop(name)
                if info["modules"]:
                    getattr(pipe, info["component"]).delete_adapters(name)
                pipe.__dict__["_studio_diffs"].pop(name, None)
                del registry[key]
                break
        else:
            return
