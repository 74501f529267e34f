"""The run and dataset settings as dataclasses (diffusion-pipe's sections plus [studio]); each field's help text is its metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        """The engine.speed mode: None, 'full', 'selective' (true + [studio] selective_checkpointing) or 'offload'."""
        full = "selective" if self.studio.selective_checkpointing else "full"
        return {False: None, True: full, "unsloth": "offload"}[self.activation_checkpointing]

    @property
    def lr_schedule(self) -> str:
        """The trainer's schedule after warm-up: 'constant', 'linear' or 'cosine' ([studio] cosine_schedule)."""
        return "cosine" if self.studio.cosine_schedule else self.lr_scheduler

    @property
    def clip_mode(self) -> str:
        """engine.training.dataset's video_clip_mode: this one, or 'multiple_overlapping' ([studio] overlapping_clips)."""
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
