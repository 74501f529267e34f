"""Run and dataset configuration: dataclasses that read and write diffusion-pipe-compatible TOML.

A run TOML holds diffusion-pipe's keys (top level, `[model]`, `[adapter]`, `[optimizer]`, `[monitoring]`) plus our
own extras in a `[studio]` table, so a file exported from the studio stays a diffusion-pipe file. A diffusion-pipe key
only ever holds a value diffusion-pipe accepts, with diffusion-pipe's meaning; a studio mode that goes further is a
`[studio]` switch refining one such value (e.g. `transformer_dtype = 'float8'` + `[studio] float8_matmuls = true`), so
diffusion-pipe runs the same file with its nearest equivalent. A dataset TOML holds the bucket settings and
`[[directory]]` entries.

Earlier studio versions wrote their own values into diffusion-pipe keys ('float8_compute', 'selective', 'cosine',
'multiple_overlapping') and kept `compile` and the timestep shift under `[studio]`: such files (runs to resume) still
load, meaning the same, and are written back in the current form.

Every field carries `metadata["help"]` (unit, range, why); the Train tab builds its form from `describe_fields` and
applies edits with `apply_overrides`, both of which validate exactly like loading a file does.

Round trip: loading remembers which keys the file set; saving writes those keys, the required keys and any value that
differs from its default, so a file read and written again has the same keys and values, and nothing else.

Command line: `python -m engine.config check RUN.toml` prints the resolved run and dataset configs or the error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from engine.files import atomic_write_text

OPTIMIZER_TYPES = ("adamw", "adamw_optimi", "adamw8bit", "AdamW8bitKahan")
DTYPES = ("bfloat16", "float16", "float32")
# diffusion-pipe's values we train with. 'float8': weights stored float8 e4m3 and computed in bf16.
TRANSFORMER_DTYPES = ("bfloat16", "float16", "float32", "float8")
# diffusion-pipe's values: true = full checkpointing; 'unsloth' = checkpoints kept in CPU memory.
ACTIVATION_CHECKPOINTING = (False, True, "unsloth")
WAN_BLOCKS = 40  # transformer blocks in Wan 2.1 14B: the upper bound for blocks_to_swap


class ConfigError(ValueError):
    """A config file or value that cannot be used: names the key, the file and what is allowed."""


def _f(default: Any = None, help: str = "", *, choices: tuple | None = None, minimum: float | None = None,
       maximum: float | None = None, required: bool = False, ignore_case: bool = False, factory=None):
    """A dataclass field with its documentation and validation rules in metadata."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "required": required,
            "ignore_case": ignore_case}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Base of every config table: remembers which of its keys were set explicitly (from a file or an override)."""

    def __post_init__(self) -> None:
        self._explicit: set[str] = set()

    def mark_explicit(self, *names: str) -> None:
        self._explicit.update(names)

    def is_explicit(self, name: str) -> bool:
        return name in getattr(self, "_explicit", set())


# --------------------------------------------------------------------------------------------------- run config

@dataclass
class ModelConfig(_Section):
    """`[model]`: which base model and how its weights are held in memory."""

    type: str = _f("wan", "Model family. Only 'wan' (Wan 2.1 I2V) is supported.", choices=("wan",), required=True)
    ckpt_path: str = _f("", "Diffusers Wan 2.1 I2V pipeline folder or hub id (e.g. "
                            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers).", required=True)
    dtype: str = _f("bfloat16", "Dtype of the non-transformer parts and of computation. bfloat16 on a GPU; float32 "
                                "for CPU runs.", choices=DTYPES, required=True)
    transformer_dtype: str = _f("bfloat16", "Storage of the frozen transformer weights. 'float8' halves their memory "
                                            "(computed in bf16; [studio] float8_matmuls also runs the matmuls in "
                                            "float8).", choices=TRANSFORMER_DTYPES)
    timestep_sample_method: str = _f("logit_normal", "How training noise levels t are drawn: 'logit_normal' "
                                                     "(favours mid t, as the Wan authors) or 'uniform'.",
                                     choices=("logit_normal", "uniform"))
    shift: float = _f(1.0, "Shift s of the sampled t: t' = t*s/(1+(s-1)t). 1 = none; >1 trains noisier steps.",
                      minimum=0.01, maximum=100.0)


@dataclass
class AdapterConfig(_Section):
    """`[adapter]`: the LoRA trained on every Linear of each attention block."""

    type: str = _f("lora", "Adapter kind. Only 'lora'.", choices=("lora",), required=True)
    rank: int = _f(32, "LoRA rank (1-256). Higher learns more detail and uses more memory; 32 is the usual.",
                   minimum=1, maximum=256, required=True)
    dtype: str = _f("bfloat16", "Dtype of the LoRA weights while training (float32 on a CPU).", choices=DTYPES,
                    required=True)
    init_from_existing: str | None = _f(None, "Folder of an earlier LoRA (adapter_model.safetensors) to start from; "
                                              "unset = fresh LoRA.")


@dataclass
class OptimizerConfig(_Section):
    """`[optimizer]`: diffusion-pipe's optimizer names, mapped by the trainer to its nearest equivalent."""

    type: str = _f("adamw_optimi", "Optimizer: adamw / adamw_optimi (AdamW), adamw8bit / AdamW8bitKahan (8-bit "
                                   "states: a quarter of AdamW's optimizer memory).", choices=OPTIMIZER_TYPES,
                   required=True, ignore_case=True)
    lr: float = _f(2e-5, "Peak learning rate (1e-6 .. 1e-3). 2e-5 suits rank-32 Wan LoRAs; raise it for lower "
                         "ranks or short runs.", minimum=0.0, maximum=1.0, required=True)
    betas: list[float] = _f(help="Adam beta1, beta2 (each 0..1).", factory=lambda: [0.9, 0.99], minimum=0.0,
                            maximum=1.0)
    weight_decay: float = _f(0.01, "Decoupled weight decay (0..1); 0.01 keeps the LoRA from drifting.",
                             minimum=0.0, maximum=1.0)
    eps: float = _f(1e-8, "Adam epsilon (>0); only change it for numerical trouble.", minimum=0.0, maximum=1.0)
    stabilize: bool = _f(False, "diffusion-pipe's AdamW8bitKahan option that scales each step down like StableAdamW. "
                                "Only false: the studio's optimizers have no such scaling.", choices=(False,))


@dataclass
class MonitoringConfig(_Section):
    """`[monitoring]`: diffusion-pipe's Weights & Biases switch. The studio logs to metrics.jsonl and TensorBoard."""

    enable_wandb: bool = _f(False, "Log to Weights & Biases (not used by the studio; kept for diffusion-pipe).")
    wandb_api_key: str | None = _f(None, "W&B API key (diffusion-pipe only).")
    wandb_tracker_name: str | None = _f(None, "W&B project name (diffusion-pipe only).")
    wandb_run_name: str | None = _f(None, "W&B run name (diffusion-pipe only).")


@dataclass
class SamplesConfig(_Section):
    """`[studio.samples]`: short I2V videos rendered with the current LoRA while training, to pick the best epoch."""

    epochs: list[int] = _f(help="Epochs after which to render a sample (e.g. [1, 5, 10]); empty = no samples.",
                           factory=list, minimum=1)
    image: str = _f("", "Still image that starts the sample; empty = first frame of the first clip.")
    prompt: str = _f("", "Sample prompt; empty = the caption of that clip.")
    frames: int = _f(17, "Frames per sample (4k+1, 5..81). Short keeps samples cheap.", minimum=1, maximum=161)
    steps: int = _f(20, "Denoising steps per sample (1..100).", minimum=1, maximum=100)
    guidance_scale: float = _f(5.0, "Classifier-free guidance (1 = off, 5 is Wan's default).", minimum=1.0,
                               maximum=20.0)


@dataclass
class StudioConfig(_Section):
    """`[studio]`: settings of our trainer that diffusion-pipe does not have."""

    lora_alpha: float | None = _f(None, "LoRA alpha; unset = rank (scale 1, what diffusion-pipe and ComfyUI "
                                        "assume).", minimum=0.0)
    seed: int = _f(42, "Seed for LoRA init, timesteps, noise and data order: same seed, same run.", minimum=0)
    float8_matmuls: bool = _f(False, "With transformer_dtype = 'float8': also run the frozen weights' matmuls in "
                                     "float8 (Hopper GPUs such as the H100; faster). diffusion-pipe computes in bf16.")
    selective_checkpointing: bool = _f(False, "With activation_checkpointing = true: keep the self-attention outputs "
                                              "and recompute only the cheap parts (faster, more memory). "
                                              "diffusion-pipe recomputes everything.")
    cosine_schedule: bool = _f(False, "With lr_scheduler = 'linear': decay to 0 along a half cosine instead of a "
                                      "straight line. diffusion-pipe decays linearly.")
    overlapping_clips: bool = _f(False, "With video_clip_mode = 'single_beginning': cut a clip longer than its frame "
                                        "bucket into overlapping windows covering all of it (the first is "
                                        "diffusion-pipe's clip).")
    state_every_n_steps: int | None = _f(None, "Save the full resume state every N optimizer steps (in addition "
                                               "to checkpoint_every_n_*); unset = off.", minimum=1)
    samples: SamplesConfig = _f(help="Samples while training.", factory=SamplesConfig)


@dataclass
class RunConfig(_Section):
    """One training run: diffusion-pipe's run TOML plus the `[studio]` table."""

    output_dir: str = _f("", "Run folder: LoRAs (epochN/), resume states (state/), metrics.jsonl. Relative paths "
                             "resolve against this TOML's folder.", required=True)
    dataset: str = _f("", "Dataset TOML path (relative to this TOML's folder).", required=True)
    epochs: int = _f(100, "Passes over the dataset (1..100000); max_steps stops earlier when set.", minimum=1,
                     maximum=100000, required=True)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps; unset = run all epochs.", minimum=1)
    micro_batch_size_per_gpu: int = _f(1, "Clips per forward pass per GPU (1..64). 1 for 14B at 480p.", minimum=1,
                                       maximum=64)
    pipeline_stages: int = _f(1, "Pipeline-parallel stages (diffusion-pipe). The studio trains data-parallel only: "
                                 "must be 1.", minimum=1, maximum=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches summed per optimizer step (1..1024): a larger effective "
                                             "batch at no extra memory.", minimum=1, maximum=1024)
    gradient_clipping: float = _f(1.0, "Clip the gradient norm to this (>0); guards against loss spikes.",
                                  minimum=0.0)
    warmup_steps: int = _f(0, "Steps of linear learning-rate warm-up from 0 (0..100000).", minimum=0, maximum=100000)
    lr_scheduler: str = _f("constant", "Learning rate after warm-up: constant, or linear decay to 0 ([studio] "
                                       "cosine_schedule decays along a cosine instead).",
                           choices=("constant", "linear"))
    eval_every_n_epochs: int | None = _f(None, "Evaluate on eval datasets every N epochs (diffusion-pipe; the "
                                               "studio renders samples instead).", minimum=1)
    eval_before_first_step: bool = _f(True, "Evaluate before training starts (diffusion-pipe only).")
    eval_micro_batch_size_per_gpu: int | None = _f(None, "Eval batch size (diffusion-pipe only).", minimum=1)
    eval_gradient_accumulation_steps: int | None = _f(None, "Eval accumulation (diffusion-pipe only).", minimum=1)
    disable_block_swap_for_eval: bool = _f(False, "Keep all blocks on the GPU while evaluating (diffusion-pipe "
                                                  "only).")
    save_every_n_epochs: int | None = _f(None, "Write epochN/adapter_model.safetensors every N epochs (the last LoRA "
                                               "is always written). Set this or save_every_n_steps: diffusion-pipe "
                                               "has no default.", minimum=1)
    save_every_n_steps: int | None = _f(None, "Also write a LoRA every N steps; unset = off.", minimum=1)
    checkpoint_every_n_epochs: int | None = _f(None, "Save the full resume state every N epochs.", minimum=1)
    checkpoint_every_n_minutes: int | None = _f(None, "Save the full resume state every N minutes of training.",
                                                minimum=1)
    activation_checkpointing: bool | str = _f(
        False, "Recompute activations in backward to save memory: true (full; [studio] selective_checkpointing "
               "recomputes only the cheap parts), 'unsloth' (saved block inputs kept in CPU memory: least GPU "
               "memory), false (as diffusion-pipe when unset).", choices=ACTIVATION_CHECKPOINTING)
    blocks_to_swap: int = _f(0, "Transformer blocks kept in pinned CPU memory and streamed to the GPU ahead of use "
                                f"(0..{WAN_BLOCKS - 1}). 32 fits 14B in 24 GB; slower.", minimum=0,
                             maximum=WAN_BLOCKS - 1)
    partition_method: str = _f("parameters", "How diffusion-pipe splits pipeline stages (unused with 1 stage).")
    save_dtype: str = _f("bfloat16", "Dtype of saved LoRA files.", choices=DTYPES)
    caching_batch_size: int = _f(1, "diffusion-pipe: clips encoded at once while caching (1..64). The studio "
                                    "encodes one clip at a time, exactly as the inference pipeline does.",
                                 minimum=1, maximum=64)
    compile: bool = _f(False, "torch.compile the transformer blocks: faster steps after a slow first one (GPU).")
    steps_per_print: int = _f(1, "Log the loss every N steps.", minimum=1)
    video_clip_mode: str = _f("single_beginning", "Which part of a clip longer than its frame bucket is used: its "
                                                  "beginning or its middle ([studio] overlapping_clips: overlapping "
                                                  "windows over all of it).",
                              choices=("single_beginning", "single_middle"))
    model: ModelConfig = _f(help="Base model.", factory=ModelConfig)
    adapter: AdapterConfig = _f(help="LoRA adapter.", factory=AdapterConfig)
    optimizer: OptimizerConfig = _f(help="Optimizer.", factory=OptimizerConfig)
    monitoring: MonitoringConfig = _f(help="Monitoring.", factory=MonitoringConfig)
    studio: StudioConfig = _f(help="Studio extras.", factory=StudioConfig)

    source: Path | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    @property
    def base_dir(self) -> Path:
        """Folder relative paths resolve against: the TOML's folder, else the working directory."""
        return self.source.parent if self.source else Path.cwd()

    def dataset_path(self) -> Path:
        return (self.base_dir / Path(self.dataset).expanduser()).resolve()

    def output_path(self) -> Path:
        return (self.base_dir / Path(self.output_dir).expanduser()).resolve()

    @property
    def lora_alpha(self) -> float:
        return self.studio.lora_alpha if self.studio.lora_alpha is not None else float(self.adapter.rank)

    @property
    def checkpointing_mode(self) -> str | None:
        """The engine.accel mode: None, 'full', 'selective' (true + [studio] selective_checkpointing) or 'offload'."""
        full = "selective" if self.studio.selective_checkpointing else "full"
        return {False: None, True: full, "unsloth": "offload"}[self.activation_checkpointing]

    @property
    def lr_schedule(self) -> str:
        """The trainer's schedule after warm-up: 'constant', 'linear' or 'cosine' ([studio] cosine_schedule)."""
        return "cosine" if self.studio.cosine_schedule else self.lr_scheduler

    @property
    def clip_mode(self) -> str:
        """engine.dataset's video_clip_mode: this one, or 'multiple_overlapping' ([studio] overlapping_clips)."""
        return "multiple_overlapping" if self.studio.overlapping_clips else self.video_clip_mode


# ----------------------------------------------------------------------------------------------- dataset config

_BUCKET_HELP = {
    "resolutions": "Pixel budgets: each N means a square N x N area (e.g. 480 for 480p-sized buckets), or [w, h] "
                   "for that area. Clips are resized to the ar bucket with this area, sides multiples of 16.",
    "enable_ar_bucket": "Group clips by aspect ratio instead of cropping them all square (unset: square, as "
                        "diffusion-pipe).",
    "min_ar": "Smallest width/height ratio of the generated ar buckets (0.1..10).",
    "max_ar": "Largest width/height ratio of the generated ar buckets (0.1..10).",
    "num_ar_buckets": "Aspect-ratio buckets spread log-evenly from min_ar to max_ar (1..64).",
    "ar_buckets": "Explicit aspect ratios (w/h numbers or [w, h] pairs); replaces min_ar/max_ar/num_ar_buckets.",
    "frame_buckets": "Frame counts clips are cut to (4k+1 for Wan, e.g. [33] or [81]); a clip uses the longest "
                     "bucket it fills.",
}


@dataclass
class DirectoryConfig(_Section):
    """One `[[directory]]`: a folder of clip.mp4 + clip.txt pairs; unset bucket keys inherit the dataset's."""

    path: str = _f("", "Folder of clips with captions beside them (clip.mp4 + clip.txt). Relative to the dataset "
                       "TOML.", required=True)
    num_repeats: int = _f(1, "Times each clip appears per epoch (1..1000): weights this folder up.", minimum=1,
                          maximum=1000)
    resolutions: list | None = _f(None, _BUCKET_HELP["resolutions"])
    enable_ar_bucket: bool | None = _f(None, _BUCKET_HELP["enable_ar_bucket"])
    min_ar: float | None = _f(None, _BUCKET_HELP["min_ar"], minimum=0.1, maximum=10.0)
    max_ar: float | None = _f(None, _BUCKET_HELP["max_ar"], minimum=0.1, maximum=10.0)
    num_ar_buckets: int | None = _f(None, _BUCKET_HELP["num_ar_buckets"], minimum=1, maximum=64)
    ar_buckets: list | None = _f(None, _BUCKET_HELP["ar_buckets"])
    frame_buckets: list[int] | None = _f(None, _BUCKET_HELP["frame_buckets"], minimum=1)


@dataclass
class DatasetConfig(_Section):
    """A dataset TOML: bucket settings and the clip folders."""

    resolutions: list = _f(help=_BUCKET_HELP["resolutions"], factory=lambda: [480], required=True)
    enable_ar_bucket: bool = _f(False, _BUCKET_HELP["enable_ar_bucket"])
    min_ar: float = _f(0.5, _BUCKET_HELP["min_ar"], minimum=0.1, maximum=10.0)
    max_ar: float = _f(2.0, _BUCKET_HELP["max_ar"], minimum=0.1, maximum=10.0)
    num_ar_buckets: int = _f(7, _BUCKET_HELP["num_ar_buckets"], minimum=1, maximum=64)
    ar_buckets: list | None = _f(None, _BUCKET_HELP["ar_buckets"])
    frame_buckets: list[int] = _f(help=_BUCKET_HELP["frame_buckets"], factory=lambda: [81], minimum=1,
                                  required=True)
    directory: list[DirectoryConfig] = _f(help="Clip folders ([[directory]] tables).", factory=list, required=True)

    source: Path | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def directory_path(self, directory: DirectoryConfig) -> Path:
        return (self.base_dir / Path(directory.path).expanduser()).resolve()

    def bucket_settings(self, directory: DirectoryConfig) -> dict[str, Any]:
        """The bucket keys in force for one directory: its own where set, else the dataset's."""
        names = ("resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "ar_buckets",
                 "frame_buckets")
        return {n: getattr(directory, n) if getattr(directory, n) is not None else getattr(self, n) for n in names}


# ------------------------------------------------------------------------------------------------- validation

# Studio modes that refine one value of a diffusion-pipe key (which diffusion-pipe then runs as that value):
# ([studio] switch, diffusion-pipe key, the value it refines, what earlier studio versions wrote into that key).
_REFINEMENTS = (
    ("float8_matmuls", "model.transformer_dtype", "float8", "float8_compute"),
    ("selective_checkpointing", "activation_checkpointing", True, "selective"),
    ("cosine_schedule", "lr_scheduler", "linear", "cosine"),
    ("overlapping_clips", "video_clip_mode", "single_beginning", "multiple_overlapping"),
)
# What earlier studio versions wrote, read as what it meant: its own values in diffusion-pipe keys, and keys it kept
# under [studio] that diffusion-pipe has with the same meaning.
_LEGACY_VALUES = {(key, old): {key: refined, f"studio.{switch}": True} for switch, key, refined, old in _REFINEMENTS}
_MOVED_KEYS = {"studio.compile": "compile", "studio.timestep_shift": "model.shift"}


def _where(file: Path | str | None) -> str:
    return f" in {file}" if file else ""


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        return f"list of {_type_name(args[0])}" if args else "list"
    if hint is list:
        return "list"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(hint, getattr(hint, "__name__",
                                                                                               str(hint)))


def _check_bucket_list(key: str, value: Any, file, *, pairs_ok: bool, integer: bool) -> list:
    """resolutions / ar_buckets: numbers, or [w, h] pairs of positive integers."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"'{key}'{_where(file)} must be a non-empty list, got {value!r}.")
    out = []
    for item in value:
        if pairs_ok and isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item):
                raise ConfigError(f"'{key}'{_where(file)}: {item!r} must be a [width, height] pair of positive "
                                  "integers.")
            out.append([int(v) for v in item])
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0 and (
                not integer or float(item).is_integer()):
            out.append(int(item) if integer else float(item) if isinstance(item, float) else item)
        else:
            kind = "positive integer" if integer else "positive number"
            raise ConfigError(f"'{key}'{_where(file)}: {item!r} must be a {kind}"
                              + (" or a [width, height] pair." if pairs_ok else "."))
    return out


def _coerce(value: Any, hint: Any, key: str, file) -> Any:
    """Check `value` against a type hint, converting only where no information is lost (int -> float)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, file)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}'{_where(file)} must be {_type_name(hint)}, got {value!r}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # a UI number box gives 3.0 for 3
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is list:
        if isinstance(value, (list, tuple)):
            (item_hint,) = typing.get_args(hint)
            try:
                return [_coerce(v, item_hint, key, file) for v in value]
            except ConfigError:
                pass
    elif hint is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"'{key}'{_where(file)} must be {_type_name(hint)}, got {value!r}.")


def _check_value(section: Any, name: str, value: Any, key: str, file) -> Any:
    """Validate one value for field `name` of a section instance; return the value to store."""
    f = section.__dataclass_fields__[name]
    hint = typing.get_type_hints(type(section))[name]
    meta = f.metadata
    if name in ("resolutions", "ar_buckets") and value is not None:
        return _check_bucket_list(key, value, file, pairs_ok=True, integer=name == "resolutions")
    if value is None and not (isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)):
        raise ConfigError(f"'{key}'{_where(file)} cannot be unset: {meta['help']}")
    value = _coerce(value, hint, key, file)
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None:
        matches = [c for c in choices if c == value and type(c) is type(value) or (
            meta.get("ignore_case") and isinstance(c, str) and isinstance(value, str) and c.lower() == value.lower())]
        if not matches:
            allowed = ", ".join(_toml_literal(c) for c in choices)
            raise ConfigError(f"'{key}'{_where(file)} is {_toml_literal(value)}; allowed values: {allowed}.")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        low, high = meta.get("minimum"), meta.get("maximum")
        if (low is not None and item < low) or (high is not None and item > high):
            span = f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"
            raise ConfigError(f"'{key}'{_where(file)} is {item!r}, outside the range {span}: {meta['help']}")
    return value


def _toml_literal(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def _section_fields(section: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section) if not f.metadata.get("internal")]


def _is_section(value: Any) -> bool:
    return isinstance(value, _Section)


def _fill_section(section: _Section, data: dict, prefix: str, file) -> None:
    """Set a section's fields from a parsed TOML table, rejecting unknown keys and bad values."""
    known = {f.name: f for f in _section_fields(section)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
            table = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(f"Unknown key '{dotted}'{_where(file)}.{hint} Keys allowed in {table}: "
                              f"{', '.join(known)}.")
        current = getattr(section, key)
        if key == "directory" and isinstance(section, DatasetConfig):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"'directory'{_where(file)} must be [[directory]] tables with a path each.")
            dirs = []
            for i, table in enumerate(value):
                directory = DirectoryConfig()
                _fill_section(directory, table, f"directory.{i}.", file)
                _require(directory, f"directory.{i}.", file)
                dirs.append(directory)
            section.directory = dirs
        elif _is_section(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}'{_where(file)} must be a table ([{dotted}]), got {value!r}.")
            _fill_section(current, value, f"{dotted}.", file)
        else:
            setattr(section, key, _check_value(section, key, value, dotted, file))
        section.mark_explicit(key)


def _require(section: _Section, prefix: str, file) -> None:
    for f in _section_fields(section):
        value = getattr(section, f.name)
        if _is_section(value):
            if section.is_explicit(f.name) or any(g.metadata.get("required") for g in _section_fields(value)):
                _require(value, f"{prefix}{f.name}.", file)
        elif f.metadata.get("required") and not section.is_explicit(f.name):
            raise ConfigError(f"Missing key '{prefix}{f.name}'{_where(file)}: {f.metadata['help']}")


def _check_consistency(cfg: RunConfig | DatasetConfig, file) -> None:
    """Rules across keys, checked after every load and override."""
    if isinstance(cfg, DatasetConfig):
        for i, directory in enumerate(cfg.directory):
            settings = cfg.bucket_settings(directory)
            if settings["min_ar"] > settings["max_ar"]:
                raise ConfigError(f"'min_ar' ({settings['min_ar']}) is above 'max_ar' ({settings['max_ar']})"
                                  f"{_where(file)} for directory {i}.")
            if not directory.path:
                raise ConfigError(f"'directory.{i}.path'{_where(file)} is empty: name a folder of clips.")
        for buckets in [cfg.frame_buckets, *(d.frame_buckets for d in cfg.directory)]:
            for frames in buckets or []:
                if frames % 4 != 1:  # the VAE packs 4 frames per latent frame after the first
                    lower = frames - (frames - 1) % 4
                    raise ConfigError(f"frame bucket {frames}{_where(file)} is not 4k+1, which Wan needs: use "
                                      f"{lower} or {lower + 4}.")
    else:
        if cfg.adapter.init_from_existing == "":
            raise ConfigError(f"'adapter.init_from_existing'{_where(file)} is empty: name a LoRA folder or leave it "
                              "out.")
        for switch, key, refined, _ in _REFINEMENTS:
            value = functools.reduce(getattr, key.split("."), cfg)
            if getattr(cfg.studio, switch) and value != refined:
                raise ConfigError(f"'studio.{switch}' = true{_where(file)} needs '{key}' = {_toml_literal(refined)}, "
                                  f"not {_toml_literal(value)}: set that, or set 'studio.{switch}' = false.")


def _check_save_cadence(cfg: RunConfig, file) -> None:
    """diffusion-pipe refuses a run TOML that sets no LoRA save cadence, so we neither read nor write one. Checked on
    load and save only: configs built in code get their cadence after construction."""
    if cfg.save_every_n_epochs is None and cfg.save_every_n_steps is None:
        raise ConfigError(f"Set 'save_every_n_epochs' or 'save_every_n_steps'{_where(file)}: diffusion-pipe refuses "
                          "a run without either (e.g. save_every_n_epochs = 1).")


# --------------------------------------------------------------------------------------------------- reading

def _upgrade_legacy(settings: dict[tuple[str, ...], Any], file) -> dict[tuple[str, ...], Any]:
    """Run settings {key path: value} with earlier studio versions' keys and values rewritten to the current form
    (same meaning); two settings that then disagree are an error."""
    out: dict[tuple[str, ...], Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for path, value in settings.items():
        key = ".".join(path)
        old = (key, value) if isinstance(value, str) else None
        for new_key, new_value in _LEGACY_VALUES.get(old, {_MOVED_KEYS.get(key, key): value}).items():
            new_path = tuple(new_key.split("."))
            if new_path in out and out[new_path] != new_value:
                raise ConfigError(f"'{origin[new_path]}' and '{key}'{_where(file)} disagree: read in the current form "
                                  f"they set '{new_key}' to {_toml_literal(out[new_path])} and "
                                  f"{_toml_literal(new_value)}. Keep one of them.")
            out[new_path], origin[new_path] = new_value, key
    return out


def _flatten(table: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{key path: value} of a parsed TOML table; empty tables stay values, so they are read as set."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, (*path, key)))
        else:
            flat[(*path, key)] = value
    return flat


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    table: dict = {}
    for path, value in flat.items():
        parent = table
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
            if not isinstance(parent, dict):  # e.g. `model = 3`: _fill_section names that key
                break
        else:
            parent[path[-1]] = value
    return table


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a diffusion-pipe run TOML (+ `[studio]`); ConfigError names any unknown, missing or bad key."""
    path = Path(path).expanduser().resolve()
    cfg = RunConfig(source=path)
    _fill_section(cfg, _nest(_upgrade_legacy(_flatten(_read_toml(path)), path)), "", path)
    _require(cfg, "", path)
    _check_consistency(cfg, path)
    _check_save_cadence(cfg, path)
    return cfg


def load_dataset_config(path: str | os.PathLike) -> DatasetConfig:
    """Read a diffusion-pipe dataset TOML; ConfigError names any unknown, missing or bad key."""
    path = Path(path).expanduser().resolve()
    cfg = DatasetConfig(source=path)
    _fill_section(cfg, _read_toml(path), "", path)
    _require(cfg, "", path)
    if not cfg.directory:
        raise ConfigError(f"{path} has no [[directory]] table: add one with the path of your clips folder.")
    _check_consistency(cfg, path)
    return cfg


# --------------------------------------------------------------------------------------------------- writing

def _section_dict(section: _Section, full: bool) -> dict:
    """The TOML table of a section: explicit, required and non-default keys (every set key when `full`)."""
    out: dict[str, Any] = {}
    for f in _section_fields(section):
        value = getattr(section, f.name)
        if isinstance(value, list) and value and all(_is_section(v) for v in value):
            out[f.name] = [_section_dict(v, full) for v in value]
        elif _is_section(value):
            table = _section_dict(value, full)
            if table or section.is_explicit(f.name):
                out[f.name] = table
        elif value is not None:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if full or section.is_explicit(f.name) or f.metadata.get("required") or value != default:
                out[f.name] = value
    return out


def to_toml(cfg: RunConfig | DatasetConfig, full: bool = False) -> str:
    """TOML text of a config; `full` also writes keys left at their defaults (what the trainer will use)."""
    data = _section_dict(cfg, full)
    directories = data.pop("directory", None) if isinstance(cfg, DatasetConfig) else None
    text = tomli_w.dumps(data)
    for table in directories or []:  # [[directory]] tables, as diffusion-pipe's examples write them
        text += "\n[[directory]]\n" + tomli_w.dumps(table)
    return text


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write a run TOML atomically (after checking it); relative paths in it resolve against its new folder."""
    _check_consistency(cfg, path)
    _check_save_cadence(cfg, path)
    path = Path(path)
    atomic_write_text(path, to_toml(cfg))
    return path


def save_dataset_config(cfg: DatasetConfig, path: str | os.PathLike) -> Path:
    """Write a dataset TOML atomically, [[directory]] tables last."""
    _check_consistency(cfg, path)
    path = Path(path)
    atomic_write_text(path, to_toml(cfg))
    return path


# ------------------------------------------------------------------------------------- form support (Train tab)

@dataclass(frozen=True)
class FieldInfo:
    """One editable setting, for a generated form."""

    key: str  # dotted key, e.g. "optimizer.lr" or "directory.0.num_repeats"
    help: str
    type: str  # "integer", "number", "true/false", "text", "list of number", ...
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    optional: bool  # may be left unset
    value: Any
    default: Any


def describe_fields(cfg: RunConfig | DatasetConfig) -> list[FieldInfo]:
    """Every setting of a config in TOML order, with its help, type, choices, range and current value."""
    out: list[FieldInfo] = []

    def walk(section: _Section, prefix: str) -> None:
        hints = typing.get_type_hints(type(section))
        for f in _section_fields(section):
            value = getattr(section, f.name)
            if _is_section(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            if f.name == "directory" and isinstance(section, DatasetConfig):
                for i, item in enumerate(value):
                    walk(item, f"{prefix}{f.name}.{i}.")
                continue
            hint = hints[f.name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
            out.append(FieldInfo(f"{prefix}{f.name}", f.metadata["help"], _type_name(hint), f.metadata["choices"],
                                 f.metadata["minimum"], f.metadata["maximum"], optional, value, default))

    walk(cfg, "")
    return out


def _parse_text(text: str) -> Any:
    """A form's text for a non-text field, read as a TOML value (e.g. "[0.9, 0.99]", "true", "2e-5")."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RunConfig | DatasetConfig, overrides: dict[str, Any]) -> RunConfig | DatasetConfig:
    """Return a copy of `cfg` with {dotted.key: value} applied, each validated as if read from the file.

    Text values for non-text fields are parsed as TOML values; None or "" unsets an optional field.
    """
    new = copy.deepcopy(cfg)
    file = cfg.source
    paths = {tuple(key.split(".")): value for key, value in overrides.items()}
    if isinstance(cfg, RunConfig):
        paths = _upgrade_legacy(paths, file)
    for (*parents, name), value in paths.items():
        key = ".".join((*parents, name))
        section: Any = new
        for part in parents:
            if isinstance(section, list) and part.isdigit() and int(part) < len(section):
                section = section[int(part)]
            elif _is_section(section) and part in {f.name for f in _section_fields(section)}:
                section = getattr(section, part)
            else:
                raise ConfigError(f"Unknown setting '{key}'{_where(file)}.")
        if not _is_section(section) or name not in {f.name for f in _section_fields(section)} or _is_section(
                getattr(section, name)):
            raise ConfigError(f"Unknown setting '{key}'{_where(file)}.")
        hint = typing.get_type_hints(type(section))[name]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        if isinstance(value, str) and optional and not value.strip():
            value = None
        elif isinstance(value, str) and hint is not str and not (optional and str in typing.get_args(hint)):
            value = _parse_text(value)
        setattr(section, name, _check_value(section, name, value, key, file))
        section.mark_explicit(name)
    _check_consistency(new, file)
    return new


# ------------------------------------------------------------------------------------------------------ presets

# Tuning constants for the GPU presets, from bench/train_step.py on one H100 (bench/RESULTS.md, 2026-11-26):
# 480x832x81 with float8 matmuls + CPU-offloaded checkpoints + 28 swapped blocks peaks at 19.6 GiB under a 24 GiB
# cap (11.2 s/step); float8 matmuls + selective checkpointing + compiled blocks peak at 54.2 GiB (9.25 s/step).
GPU24_BLOCKS_TO_SWAP = 28
GPU24_RESOLUTION = 624  # diffusion-pipe's square-side budget: 624^2 ~ 480x832
GPU24_FRAMES = 81
GPU48_BLOCKS_TO_SWAP = 0  # full checkpointing drops the kept attention outputs (~12.5 GiB) of the 54 GiB run
GPU48_RESOLUTION = 624
GPU48_FRAMES = 81
GPU80_BLOCKS_TO_SWAP = 0
GPU80_RESOLUTION = 624
GPU80_FRAMES = 81
# CPU demo: the demo clips (17 frames) at a small size; trains in seconds with the tiny kit.
CPU_DEMO_RESOLUTION = 64
CPU_DEMO_FRAMES = 17
CPU_DEMO_RANK = 4
CPU_DEMO_EPOCHS = 3

PRESET_24GB = "24 GB GPU (low memory)"
PRESET_48GB = "48 GB"
PRESET_80GB = "80 GB"
PRESET_CPU_DEMO = "CPU demo (tiny model)"

# What every GPU preset shares: the seed's hyperparameters (rank 32, lr 2e-5, betas, weight decay), float8 matmuls
# for the frozen base, compiled blocks, and the save/checkpoint cadence.
_GPU_PRESET_BASE: dict[str, Any] = {
    "model.dtype": "bfloat16", "model.transformer_dtype": "float8", "studio.float8_matmuls": True, "adapter.rank": 32,
    "adapter.dtype": "bfloat16", "optimizer.lr": 2e-5, "optimizer.betas": [0.9, 0.99], "optimizer.weight_decay": 0.01,
    "save_every_n_epochs": 5, "checkpoint_every_n_minutes": 30, "warmup_steps": 100, "gradient_clipping": 1.0,
    "compile": True,
}

_RUN_PRESETS: dict[str, dict[str, Any]] = {
    PRESET_24GB: {**_GPU_PRESET_BASE, "epochs": 1000, "optimizer.type": "AdamW8bitKahan",
                  "activation_checkpointing": "unsloth", "blocks_to_swap": GPU24_BLOCKS_TO_SWAP},
    PRESET_48GB: {**_GPU_PRESET_BASE, "epochs": 500, "optimizer.type": "adamw8bit", "activation_checkpointing": True,
                  "blocks_to_swap": GPU48_BLOCKS_TO_SWAP},
    PRESET_80GB: {**_GPU_PRESET_BASE, "epochs": 500, "optimizer.type": "adamw_optimi",
                  "activation_checkpointing": True, "studio.selective_checkpointing": True,
                  "blocks_to_swap": GPU80_BLOCKS_TO_SWAP},
    PRESET_CPU_DEMO: {
        "epochs": CPU_DEMO_EPOCHS, "model.dtype": "float32", "model.transformer_dtype": "float32",
        "adapter.rank": CPU_DEMO_RANK, "adapter.dtype": "float32", "optimizer.type": "adamw",
        "optimizer.lr": 1e-3, "activation_checkpointing": False, "blocks_to_swap": 0, "save_every_n_epochs": 1,
        "checkpoint_every_n_epochs": 1, "save_dtype": "float32", "studio.samples.epochs": [CPU_DEMO_EPOCHS],
        "studio.samples.steps": 2, "studio.samples.frames": CPU_DEMO_FRAMES,
    },
}

# Every preset groups clips by aspect ratio (left unset, diffusion-pipe crops them all square). Its range is written
# out too: diffusion-pipe's utils/dataset.py has no default for min_ar, max_ar and num_ar_buckets.
_AR_RANGE = {f.name: f.default for f in dataclasses.fields(DatasetConfig)
             if f.name in ("min_ar", "max_ar", "num_ar_buckets")}
_DATASET_PRESETS: dict[str, dict[str, Any]] = {
    name: {"enable_ar_bucket": True, **_AR_RANGE, "resolutions": [resolution], "frame_buckets": [frames]}
    for name, resolution, frames in ((PRESET_24GB, GPU24_RESOLUTION, GPU24_FRAMES),
                                     (PRESET_48GB, GPU48_RESOLUTION, GPU48_FRAMES),
                                     (PRESET_80GB, GPU80_RESOLUTION, GPU80_FRAMES),
                                     (PRESET_CPU_DEMO, CPU_DEMO_RESOLUTION, CPU_DEMO_FRAMES))
}


def presets() -> dict[str, dict[str, Any]]:
    """Preset name -> RunConfig overrides ({dotted.key: value}), in the order the Train tab lists them."""
    return {name: dict(values) for name, values in _RUN_PRESETS.items()}


def dataset_presets() -> dict[str, dict[str, Any]]:
    """Preset name -> DatasetConfig overrides."""
    return {name: dict(values) for name, values in _DATASET_PRESETS.items()}


def preset_configs(name: str, *, clips_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   model_path: str | os.PathLike,
                   dataset_file: str = "dataset.toml") -> tuple[RunConfig, DatasetConfig]:
    """A complete run + dataset config for a preset: train on `clips_dir`, write to `output_dir`.

    `dataset_file` is stored as written in the run TOML (relative = beside the run TOML, as the studio saves them).
    For a project: `preset_configs(name, clips_dir=project.clips_dir, output_dir=project.run_dir(run),
    model_path=project's model)`.
    """
    if name not in _RUN_PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; allowed values: {', '.join(_RUN_PRESETS)}.")
    run = RunConfig(output_dir=str(Path(output_dir)), dataset=dataset_file)
    run.model.ckpt_path = str(model_path)
    run = apply_overrides(run, _RUN_PRESETS[name])
    dataset = DatasetConfig(directory=[DirectoryConfig(path=str(Path(clips_dir)))])
    dataset = apply_overrides(dataset, _DATASET_PRESETS[name])
    return run, dataset


# ------------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load a run TOML and its dataset TOML; print them with defaults filled in")
    check.add_argument("run_toml")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.run_toml)
        dataset = load_dataset_config(run.dataset_path())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"# run config: {run.source}\n{to_toml(run, full=True)}")
    print(f"# dataset config: {dataset.source}\n{to_toml(dataset, full=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
