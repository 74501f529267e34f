"""The pre-flight check of a run: the dataset report (errors block a run, warnings don't) and what the run will take
(steps, time, disk), counted as the trainer counts. The Train tab's "Check dataset" and
`python -m engine.training --config run.toml --check` show it.

The step count comes from engine.training.parallel's step arithmetic, the functions the Trainer itself uses: per-bucket
micro-batches, shared over the GPUs, `gradient_accumulation_steps` of them a step, capped by max_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.core.models import wan_transformer_config
from engine.training.dataset import scan_dataset
from engine.training.parallel import micro_batches_per_rank, planned_steps
from engine.training.schema import DatasetConfig, RunConfig

ADAM_MOMENTS = 2  # the optimizer state a resume state keeps per LoRA value, beside the value itself


def lora_size_bytes(model_path: str, rank: int, bytes_per_value: int = 2) -> int | None:
    """Size of one saved LoRA: rank x (in + out) for every Linear of each block (10 of width d, 2 of the FFN);
    None when the model folder's transformer/config.json cannot be read (a hub id)."""
    transformer = wan_transformer_config(model_path)
    try:
        width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        per_block = rank * (10 * 2 * width + 2 * (width + transformer["ffn_dim"]))
        return per_block * transformer["num_layers"] * bytes_per_value
    except (TypeError, KeyError):
        return None


def human_bytes(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_seconds(seconds: float | None) -> str:
    """Seconds as m:ss or h:mm:ss; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Preflight:
    """The dataset check and the run's estimate. Errors block a run, warnings don't."""

    run: RunConfig
    num_gpus: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    clips: int = 0
    samples: int = 0  # training examples per epoch, num_repeats included
    micro_batches_per_epoch: int = 0  # on each GPU
    total_steps: int = 0  # optimizer steps of the whole run, as the trainer will count them
    measured_steps_per_s: float | None = None
    lora_bytes: int | None = None  # one saved LoRA

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps per epoch (fractional when accumulation does not divide an epoch's micro-batches)."""
        return self.micro_batches_per_epoch / self.run.gradient_accumulation_steps

    @property
    def epoch_s(self) -> float | None:
        return self.steps_per_epoch / self.measured_steps_per_s if self.measured_steps_per_s else None

    @property
    def total_s(self) -> float | None:
        return self.total_steps / self.measured_steps_per_s if self.measured_steps_per_s else None

    @property
    def saved_loras(self) -> int:
        every = self.run.save_every_n_epochs
        return max(1, self.run.epochs // every) if every else 0

    @property
    def state_bytes(self) -> int | None:
        """One resume state: the LoRA and its optimizer moments, in float32."""
        if self.lora_bytes is None:
            return None
        return self.lora_bytes // _value_bytes(self.run) * 4 * (1 + ADAM_MOMENTS)

    def estimate(self) -> str:
        """Steps, time and disk in a few Markdown lines."""
        run = self.run
        limit = f", max_steps {run.max_steps}" if run.max_steps else ""
        gpus = f" on each of {self.num_gpus} GPUs" if self.num_gpus > 1 else ""
        lines = [f"**{self.clips} clips**, {self.samples} samples per epoch: {self.micro_batches_per_epoch} "
                 f"micro-batches of up to {run.micro_batch_size_per_gpu}{gpus}, "
                 f"**{self.steps_per_epoch:g} steps per epoch** (gradient accumulation "
                 f"{run.gradient_accumulation_steps}), **{self.total_steps} steps** in all "
                 f"({run.epochs} epochs{limit})."]
        if self.measured_steps_per_s:
            lines.append(f"Time per epoch ≈ {human_seconds(self.epoch_s)} at the measured "
                         f"{self.measured_steps_per_s:.3g} steps/s; whole run ≈ {human_seconds(self.total_s)}.")
        else:
            lines.append("Time per epoch: shown once the first steps are measured.")
        if self.lora_bytes and self.saved_loras:
            lines.append(f"Disk: each LoRA ≈ {human_bytes(self.lora_bytes)}, {self.saved_loras} saved ≈ "
                         f"{human_bytes(self.saved_loras * self.lora_bytes)}; each resume state ≈ "
                         f"{human_bytes(self.state_bytes)} (LoRA and optimizer moments in float32).")
        return "\n\n".join(lines)


def _value_bytes(run: RunConfig) -> int:
    return 4 if run.lora_save_dtype == "float32" else 2


def preflight(run: RunConfig, dataset: DatasetConfig, *, num_gpus: int = 1,
              measured_steps_per_s: float | None = None) -> Preflight:
    """Scan the dataset (never raises for bad data: problems are in `errors`/`warnings`) and count the run's steps
    on `num_gpus` data-parallel GPUs; `measured_steps_per_s` (from an earlier run) turns steps into time."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, not {num_gpus}")
    report = scan_dataset(dataset, video_clip_mode=run.clip_mode)
    buckets = report.bucket_counts()
    per_epoch = micro_batches_per_rank(buckets.values(), batch_size=run.micro_batch_size_per_gpu,
                                       world_size=num_gpus)
    return Preflight(
        run=run, num_gpus=num_gpus, errors=[str(issue) for issue in report.errors],
        warnings=[str(issue) for issue in report.warnings], clips=len(report.clips), samples=sum(buckets.values()),
        micro_batches_per_epoch=per_epoch,
        total_steps=planned_steps(per_epoch, epochs=run.epochs, accumulation=run.gradient_accumulation_steps,
                                  max_steps=run.max_steps) if per_epoch else 0,
        measured_steps_per_s=measured_steps_per_s,
        lora_bytes=lora_size_bytes(run.model.ckpt_path, run.adapter.rank, _value_bytes(run)))
