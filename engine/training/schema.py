"""The run and dataset settings as dataclasses (diffusion-pipe's sections plus [studio]), help text as metadata.

Every key diffusion-pipe reads for a Wan LoRA run is accepted: a field here where the studio applies it (or a field with
`unused` metadata where it reads but does not act on it), else an entry of its table's `KEPT` (kept verbatim, written
back on export, named as not used). The lists come from diffusion-pipe's own source, github.com/tdrussell/diffusion-pipe
at commit 8f83dbf25d03219df705570ec03e62be04bc402f (2026-08-20): train.py (set_config_defaults, the config reads in
main, get_optimizer, the lr_scheduler branch), utils/dataset.py (DirectoryDataset, Dataset), utils/saver.py,
utils/common.py (DTYPE_MAP, get_t_distribution), models/base.py (extract_clips, configure_adapter, get_loss_fn),
models/wan/wan.py (WanPipeline), examples/main_example.toml, examples/dataset.toml, examples/wan_14b_min_vram.toml and
docs/supported_models.md (Wan2.1, Wan2.2). A key only another model family reads (e.g. `vae_path`) is not listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

# The optimizers the studio trains with (mapped by engine.training.optim to their nearest equivalents).
OPTIMIZER_TYPES = ("adamw", "adamw_optimi", "adamw8bit", "AdamW8bitKahan")


# The other optimizer names diffusion-pipe's get_optimizer knows (any other name it loads from pytorch_optimizer).
OTHER_DIFFUSION_PIPE_OPTIMIZERS = ("stableadamw", "sgd", "offload", "automagic", "genericoptim")


# diffusion-pipe's optimizer names the studio trains as torch AdamW: 'offload' is torchao's CPU-offloaded torch AdamW
# (the same update), 'stableadamw' is optimi's StableAdamW (AdamW whose steps shrink where the squared gradient
# outgrows its running average: the nearest the studio has). {lowercase name: what the studio's AdamW is to it}
ADAMW_EQUIVALENTS = {"offload": "the same update rule, its states kept on the GPU",
                     "stableadamw": "without StableAdamW's step scaling, the nearest the studio has"}


# A pytorch_optimizer class name (e.g. 'Prodigy', 'CAME'), which diffusion-pipe loads by name.
OPTIMIZER_CLASS_NAME = r"[A-Z][A-Za-z0-9_]*"


DTYPES = ("bfloat16", "float16", "float32")


# diffusion-pipe's values we train with. 'float8': weights stored float8 e4m3 and computed in bf16.
TRANSFORMER_DTYPES = ("bfloat16", "float16", "float32", "float8")


# Further float8 names of diffusion-pipe's DTYPE_MAP (utils/common.py): 'float8_e4m3fn' is 'float8'; the studio stores
# 'float8_e5m2' as its float8 (e4m3 with row scales), the nearest it has.
FLOAT8_ALIASES = ("float8_e4m3fn", "float8_e5m2")


# diffusion-pipe's schedules after warm-up (train.py): ConstantLR, LinearLR to 0, CosineAnnealingLR to 1e-6.
LR_SCHEDULERS = ("constant", "linear", "cosine")


# diffusion-pipe's values: true = full checkpointing; 'unsloth' = checkpoints kept in CPU memory.
ACTIVATION_CHECKPOINTING = (False, True, "unsloth")


WAN_BLOCKS = 40  # transformer blocks in Wan 2.1 14B: the upper bound for blocks_to_swap


class ConfigError(ValueError):
    """A config file or value that cannot be used: names the key, the file and what is allowed."""


def _f(default: Any = None, help: str = "", *, choices: tuple | None = None, minimum: float | None = None,
       maximum: float | None = None, required: bool = False, ignore_case: bool = False, factory=None,
       also: tuple = (), also_matching: str | None = None, unused: str | None = None):
    """A dataclass field with its documentation and validation rules in metadata.

    `choices` are offered in the form; `also` lists further accepted values and `also_matching` a regular expression
    of further accepted text (values diffusion-pipe takes that the form does not offer). `unused`: a diffusion-pipe key
    the studio reads but does not act on, with what it does instead (named by engine.training.interop.notices).
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "required": required,
            "ignore_case": ignore_case, "also": also, "also_matching": also_matching, "unused": unused}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Kept(NamedTuple):
    """A diffusion-pipe key the studio accepts and writes back unchanged but does not use."""

    hint: Any  # the TOML value type diffusion-pipe takes, checked on reading (the value itself is kept as written)
    why: str  # what the studio does instead, for the notice that names the key


# Why the studio does not use a diffusion-pipe key (one sentence each; keys sharing one are named together).
_EVAL = "the studio does not evaluate on held-out datasets: [studio.samples] renders videos to compare epochs"
_LOGGING = "the studio logs the loss every steps_per_print steps to metrics.jsonl and TensorBoard, against steps"
_PIPELINE = "the studio trains data-parallel, without pipeline stages"
_CACHING = "the studio caches one clip at a time, keyed by content, and encodes a changed clip again by itself"
_VIDEO_ONLY = "the studio trains Wan I2V on videos only"
_LOSS = "the studio trains with the mean squared error"
_MONITORING = "the studio logs to metrics.jsonl and TensorBoard (tb/), not to Weights & Biases"
_CAPTIONS = "the studio trains each caption as written in clip.txt, without prefix or tag shuffling"
_MASKS = "the studio trains without loss masks or control videos"
_SINGLE_FILES = ("the studio loads the transformer(s) and UMT5 from the diffusers folder in ckpt_path, not single "
                 "files (Wan 2.2: the experts trained follow from min_t / max_t)")


@dataclass
class _Section:
    """Base of every config table: remembers which of its keys were set explicitly (from a file or an override), and
    holds the diffusion-pipe keys of its table that the studio keeps but does not use."""

    kept: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"internal": True})

    KEPT: ClassVar[dict[str, Kept]] = {}  # this table's diffusion-pipe keys without a field: kept, not used
    OTHER_KEYS: ClassVar[Kept | None] = None  # any other key is accepted and kept as this says (optimizer arguments)
    REFUSED: ClassVar[dict[str, str]] = {}  # keys diffusion-pipe refuses, with what to do instead

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

    type: str = _f("wan", "Model type: 'wan' (Wan 2.1 I2V 14B or Wan 2.2 I2V A14B, told apart by the folder).",
                   choices=("wan",), required=True)
    ckpt_path: str = _f("", "Diffusers Wan I2V pipeline folder or hub id: Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, or "
                            "Wan-AI/Wan2.2-I2V-A14B-Diffusers (two experts: a LoRA for each).", required=True)
    dtype: str = _f("bfloat16", "Dtype of the non-transformer parts and of computation. bfloat16 on a GPU; float32 "
                                "for CPU runs.", choices=DTYPES, required=True)
    transformer_dtype: str = _f("bfloat16", "Storage of the frozen transformer weights. 'float8' halves their memory "
                                            "(computed in bf16; [studio] float8_matmuls also runs the matmuls in "
                                            "float8).", choices=TRANSFORMER_DTYPES, also=FLOAT8_ALIASES)
    timestep_sample_method: str = _f("logit_normal", "How training noise levels t are drawn: 'logit_normal' "
                                                     "(favours mid t, as the Wan authors) or 'uniform'.",
                                     choices=("logit_normal", "uniform"))
    shift: float = _f(1.0, "Shift s of the sampled t: t' = t*s/(1+(s-1)t). 1 = none; >1 trains noisier steps.",
                      minimum=0.01, maximum=100.0)
    min_t: float = _f(0.0, "Lowest noise level t trained (0..1, applied after the shift, as diffusion-pipe). Wan 2.2: "
                           "min_t = the boundary (0.9) trains the high-noise expert alone.", minimum=0.0, maximum=1.0)
    max_t: float = _f(1.0, "Highest noise level t trained (0..1). Wan 2.2: max_t = the boundary (0.9) trains the "
                           "low-noise expert alone; 0..1 trains both, each t by the expert that owns it.",
                      minimum=0.0, maximum=1.0)

    @property
    def float8(self) -> bool:
        """Whether the frozen transformer is stored in float8 ('float8' or one of diffusion-pipe's float8 names)."""
        return self.transformer_dtype in ("float8", *FLOAT8_ALIASES)

    KEPT: ClassVar[dict[str, Kept]] = {
        "transformer_path": Kept(str, _SINGLE_FILES),
        "llm_path": Kept(str, _SINGLE_FILES),
        "sigmoid_scale": Kept(float, "the studio's logit-normal t has scale 1"),
        "flux_shift": Kept(bool, "the studio shifts t by [model] shift only"),
        "cache_text_embeddings": Kept(bool, "the studio always caches the text embeddings"),
        "text_encoder_fp8": Kept(bool, "the studio runs UMT5 in [model] dtype"),
    }


@dataclass
class AdapterConfig(_Section):
    """`[adapter]`: the LoRA trained on every Linear of each attention block."""

    type: str = _f("lora", "Adapter kind. Only 'lora'.", choices=("lora",), required=True)
    rank: int = _f(32, "LoRA rank (1-256). Higher learns more detail and uses more memory; 32 is the usual.",
                   minimum=1, maximum=256, required=True)
    dtype: str | None = _f(None, "Dtype of the LoRA weights while training (float32 on a CPU); unset = [model] dtype, "
                                 "as diffusion-pipe.", choices=DTYPES)
    init_from_existing: str | None = _f(None, "Folder of an earlier LoRA (adapter_model.safetensors) to start from; "
                                              "unset = fresh LoRA.")

    KEPT: ClassVar[dict[str, Kept]] = {
        "dropout": Kept(float, "the studio trains the LoRA without dropout"),
        "exclude_modules": Kept(list | str, "the studio puts the LoRA on every Linear of each block"),
    }
    REFUSED: ClassVar[dict[str, str]] = {
        "alpha": "diffusion-pipe refuses it (train.py forces alpha = rank). Remove it; for the studio's own alpha set "
                 "[studio] lora_alpha.",
    }


@dataclass
class OptimizerConfig(_Section):
    """`[optimizer]`: diffusion-pipe's optimizer names, mapped by the trainer to its nearest equivalent."""

    type: str = _f("adamw_optimi", "Optimizer: adamw / adamw_optimi (AdamW), adamw8bit / AdamW8bitKahan (8-bit "
                                   "states: a quarter of AdamW's optimizer memory). diffusion-pipe's others "
                                   "(stableadamw, sgd, ..., pytorch_optimizer class names) are kept for it.",
                   choices=OPTIMIZER_TYPES, required=True, ignore_case=True, also=OTHER_DIFFUSION_PIPE_OPTIMIZERS,
                   also_matching=OPTIMIZER_CLASS_NAME)
    lr: float = _f(2e-5, "Peak learning rate (1e-6 .. 1e-3). 2e-5 suits rank-32 Wan LoRAs; raise it for lower "
                         "ranks or short runs. Needed to train here (diffusion-pipe's optimizers have defaults).",
                   minimum=0.0, maximum=1.0)
    betas: list[float] = _f(help="Adam beta1, beta2 (each 0..1).", factory=lambda: [0.9, 0.99], minimum=0.0,
                            maximum=1.0)
    weight_decay: float = _f(0.01, "Decoupled weight decay (0..1); 0.01 keeps the LoRA from drifting.",
                             minimum=0.0, maximum=1.0)
    eps: float = _f(1e-8, "Adam epsilon (>0); only change it for numerical trouble.", minimum=0.0, maximum=1.0)
    stabilize: bool = _f(False, "diffusion-pipe's AdamW8bitKahan option that scales each step down like StableAdamW. "
                                "The studio's optimizers have no such scaling (true is kept for diffusion-pipe).")

    KEPT: ClassVar[dict[str, Kept]] = {
        "gradient_release": Kept(bool, "the studio steps the optimizer once after the whole backward pass"),
        "beta2_half_life": Kept(float, "the studio takes betas as written"),
    }
    # diffusion-pipe passes every other key to its optimizer class as a keyword argument (train.py get_optimizer).
    OTHER_KEYS: ClassVar[Kept | None] = Kept(
        bool | int | float | str | list, "diffusion-pipe passes it to its optimizer; the studio's optimizers take lr, "
                                         "betas, weight_decay and eps")


@dataclass
class MonitoringConfig(_Section):
    """`[monitoring]`: diffusion-pipe's Weights & Biases switch. The studio logs to metrics.jsonl and TensorBoard."""

    enable_wandb: bool = _f(False, "Log to Weights & Biases (not used by the studio; kept for diffusion-pipe).",
                            unused=_MONITORING)
    wandb_api_key: str | None = _f(None, "W&B API key (diffusion-pipe only).", unused=_MONITORING)
    wandb_tracker_name: str | None = _f(None, "W&B project name (diffusion-pipe only).", unused=_MONITORING)
    wandb_run_name: str | None = _f(None, "W&B run name (diffusion-pipe only).", unused=_MONITORING)


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
    overlapping_clips: bool = _f(False, "With video_clip_mode = 'single_beginning': cut a clip longer than its frame "
                                        "bucket into overlapping windows covering all of it (the first is "
                                        "diffusion-pipe's clip).")
    high_noise_lr: float | None = _f(None, "Wan 2.2: learning rate of the high-noise expert's LoRA; unset = "
                                           "[optimizer] lr.", minimum=0.0, maximum=1.0)
    low_noise_lr: float | None = _f(None, "Wan 2.2: learning rate of the low-noise expert's LoRA; unset = "
                                          "[optimizer] lr.", minimum=0.0, maximum=1.0)
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
    lr_scheduler: str = _f("constant", "Learning rate after warm-up, as diffusion-pipe schedules it over epochs x "
                                       "steps per epoch: constant, linear (down to 0) or cosine (down to 1e-6).",
                           choices=LR_SCHEDULERS)
    eval_every_n_epochs: int | None = _f(None, "Evaluate on eval datasets every N epochs (diffusion-pipe; the "
                                               "studio renders samples instead).", minimum=1, unused=_EVAL)
    eval_before_first_step: bool = _f(True, "Evaluate before training starts (diffusion-pipe only).", unused=_EVAL)
    eval_micro_batch_size_per_gpu: int | None = _f(None, "Eval batch size (diffusion-pipe only).", minimum=1,
                                                   unused=_EVAL)
    eval_gradient_accumulation_steps: int | None = _f(None, "Eval accumulation (diffusion-pipe only).", minimum=1,
                                                      unused=_EVAL)
    disable_block_swap_for_eval: bool = _f(False, "Keep all blocks on the GPU while evaluating (diffusion-pipe "
                                                  "only).", unused=_EVAL)
    save_every_n_epochs: int | None = _f(None, "Write epochN/adapter_model.safetensors every N epochs (the last LoRA "
                                               "is always written). Set this or save_every_n_steps: diffusion-pipe "
                                               "has no default.", minimum=1)
    save_every_n_steps: int | None = _f(None, "Also write a LoRA every N steps; unset = off.", minimum=1)
    save_every_n_examples: int | None = _f(None, "Write a LoRA every N training clips instead (N // global batch "
                                                 "steps; replaces save_every_n_steps, as in diffusion-pipe).",
                                           minimum=1)
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
    partition_method: str = _f("parameters", "How diffusion-pipe splits pipeline stages (unused with 1 stage).",
                               unused=_PIPELINE)
    save_dtype: str | None = _f(None, "Dtype of saved LoRA files; unset = the LoRA's training dtype (adapter.dtype), "
                                      "as diffusion-pipe.", choices=DTYPES)
    caching_batch_size: int = _f(1, "diffusion-pipe: clips encoded at once while caching (1..64). The studio "
                                    "encodes one clip at a time, exactly as the inference pipeline does.",
                                 minimum=1, maximum=64, unused=_CACHING)
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

    KEPT: ClassVar[dict[str, Kept]] = {
        "eval_datasets": Kept(list, _EVAL),
        "eval_every_n_steps": Kept(int, _EVAL),
        "eval_every_n_examples": Kept(int, _EVAL),
        "eval_image_micro_batch_size_per_gpu": Kept(int | list, _EVAL),
        "image_eval_micro_batch_size_per_gpu": Kept(int | list, _EVAL),  # examples/main_example.toml's spelling
        "image_micro_batch_size_per_gpu": Kept(int | list, _VIDEO_ONLY),
        "logging_steps": Kept(int, _LOGGING),
        "x_axis_examples": Kept(bool, _LOGGING),
        "partition_split": Kept(list, _PIPELINE),
        "reentrant_activation_checkpointing": Kept(bool, "the studio chooses its own checkpointing implementation"),
        "map_num_proc": Kept(int, _CACHING),
        "regenerate_cache": Kept(bool, _CACHING),
        "force_constant_lr": Kept(float, "the studio's learning rate follows [optimizer] lr, warmup_steps and "
                                         "lr_scheduler"),
        "uncond_fraction": Kept(float, "the studio always trains with the caption"),
        "huber_delta": Kept(float, _LOSS),
        "smooth_l1_beta": Kept(float, _LOSS),
        "pseudo_huber_c": Kept(float, _LOSS),  # named in examples/main_example.toml, not read by its train.py
        "resume_from_checkpoint": Kept(bool | str, "the studio resumes a run with Resume (--resume)"),
    }

    @property
    def base_dir(self) -> Path:
        """Folder relative paths resolve against: the TOML's folder, else the working directory."""
        return self.source.parent if self.source else Path.cwd()

    def dataset_path(self) -> Path:
        return (self.base_dir / Path(self.dataset).expanduser()).resolve()

    def output_path(self) -> Path:
        return (self.base_dir / Path(self.output_dir).expanduser()).resolve()

    @property
    def adapter_dtype(self) -> str:
        """The LoRA's dtype as diffusion-pipe takes it: [adapter] dtype, else [model] dtype (train.py)."""
        return self.adapter.dtype or self.model.dtype

    @property
    def lora_save_dtype(self) -> str:
        """The dtype LoRA files are saved in: save_dtype, else the adapter's dtype (diffusion-pipe's utils/saver.py)."""
        return self.save_dtype or self.adapter_dtype

    @property
    def lora_alpha(self) -> float:
        return self.studio.lora_alpha if self.studio.lora_alpha is not None else float(self.adapter.rank)

    @property
    def checkpointing_mode(self) -> str | None:
        """The engine.speed mode: None, 'full', 'selective' (true + [studio] selective_checkpointing) or 'offload'."""
        full = "selective" if self.studio.selective_checkpointing else "full"
        return {False: None, True: full, "unsloth": "offload"}[self.activation_checkpointing]

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
    num_repeats: int | None = _f(None, "Times each clip of this folder appears per epoch (1..1000): weights it up; "
                                       "unset = the dataset's num_repeats.", minimum=1, maximum=1000)
    resolutions: list | None = _f(None, _BUCKET_HELP["resolutions"])
    enable_ar_bucket: bool | None = _f(None, _BUCKET_HELP["enable_ar_bucket"])
    min_ar: float | None = _f(None, _BUCKET_HELP["min_ar"], minimum=0.1, maximum=10.0)
    max_ar: float | None = _f(None, _BUCKET_HELP["max_ar"], minimum=0.1, maximum=10.0)
    num_ar_buckets: int | None = _f(None, _BUCKET_HELP["num_ar_buckets"], minimum=1, maximum=64)
    ar_buckets: list | None = _f(None, _BUCKET_HELP["ar_buckets"])
    frame_buckets: list[int] | None = _f(None, _BUCKET_HELP["frame_buckets"], minimum=1)

    KEPT: ClassVar[dict[str, Kept]] = {
        "size_buckets": Kept(list, "the studio buckets by resolutions and aspect ratios"),
        "cache_shuffle_num": Kept(int, _CAPTIONS),
        "cache_shuffle_delimiter": Kept(str, _CAPTIONS),
        "shuffle_tags": Kept(bool, _CAPTIONS),
        "caption_prefix": Kept(str, _CAPTIONS),
        "shuffle_metadata": Kept(bool, "the studio orders the clips from [studio] seed"),
        "skip_empty_caption": Kept(bool, "the studio's dataset check reports a clip without a caption"),
        "online_captions": Kept(bool, "the studio reads clip.txt beside each clip, not captions.json"),
        "mask_path": Kept(str, _MASKS),
        "control_path": Kept(str, _MASKS),
        "default_mask_file": Kept(str, _MASKS),
    }


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
    num_repeats: int = _f(1, "Times each clip appears per epoch (1..1000) where its [[directory]] does not say.",
                          minimum=1, maximum=1000)
    directory: list[DirectoryConfig] = _f(help="Clip folders ([[directory]] tables).", factory=list, required=True)

    source: Path | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    KEPT: ClassVar[dict[str, Kept]] = {
        **{key: rule for key, rule in DirectoryConfig.KEPT.items() if key not in ("mask_path", "control_path",
                                                                                 "default_mask_file")},
        "subsample_ratio": Kept(float, "the studio trains on every clip"),
    }

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def directory_path(self, directory: DirectoryConfig) -> Path:
        return (self.base_dir / Path(directory.path).expanduser()).resolve()

    def bucket_settings(self, directory: DirectoryConfig) -> dict[str, Any]:
        """The bucket keys and num_repeats in force for one directory: its own where set, else the dataset's."""
        names = ("resolutions", "enable_ar_bucket", "min_ar", "max_ar", "num_ar_buckets", "ar_buckets",
                 "frame_buckets", "num_repeats")
        return {n: getattr(directory, n) if getattr(directory, n) is not None else getattr(self, n) for n in names}
