"""The pre-flight check of a run: the dataset report (errors block a run, warnings don't) and an estimate of steps,
time and disk use. The Train tab's "Check dataset" and `python -m engine.training --config run.toml --check` show it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.training.dataset import scan_dataset
from engine.training.schema import DatasetConfig, RunConfig


def lora_size_bytes(model_path: str, rank: int, bytes_per_value: int = 2) -> int | None:
    """Size of one saved LoRA: rank x (in + out) for every Linear of each block (10 of width d, 2 of the FFN)."""
    try:
        transformer = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
        width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        per_block = rank * (10 * 2 * width + 2 * (width + transformer["ffn_dim"]))
        return per_block * transformer["num_layers"] * bytes_per_value
    except (OSError, KeyError, ValueError):
        return None


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def preflight(run: RunConfig, dataset: DatasetConfig, measured_steps_per_s: float | None = None
              ) -> tuple[list[str], list[str], str]:
    """The dataset report (errors block a run, warnings don't) and an estimate of steps, time and disk use."""
    report = scan_dataset(dataset, video_clip_mode=run.clip_mode)
    errors = [str(issue) for issue in report.errors]
    warnings = [str(issue) for issue in report.warnings]
    samples = sum(report.bucket_counts().values())
    batch = run.micro_batch_size_per_gpu * run.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(samples / batch)) if samples else 0
    total = steps_per_epoch * run.epochs
    if run.max_steps:
        total = min(total, run.max_steps)
    limit = f", max_steps {run.max_steps}" if run.max_steps else ""
    lines = [f"**{len(report.clips)} clips**, {samples} samples per epoch: **{steps_per_epoch} steps per epoch**, "
             f"**{total} steps** in all ({run.epochs} epochs{limit})."]
    if measured_steps_per_s:
        epoch_s, total_s = steps_per_epoch / measured_steps_per_s, total / measured_steps_per_s
        lines.append(f"Time per epoch ≈ {human_seconds(epoch_s)} at the measured {measured_steps_per_s:.3g} steps/s; "
                     f"whole run ≈ {human_seconds(total_s)}.")
    else:
        lines.append("Time per epoch: shown once the first steps are measured.")
    value_bytes = 4 if run.lora_save_dtype == "float32" else 2
    lora = lora_size_bytes(run.model.ckpt_path, run.adapter.rank, value_bytes)
    if lora and run.save_every_n_epochs:
        saves = max(1, run.epochs // run.save_every_n_epochs)
        state = lora // value_bytes * 4 * 3  # LoRA weights and Adam's two moments, in float32
        lines.append(f"Disk: each LoRA ≈ {human_bytes(lora)}, {saves} saved ≈ {human_bytes(saves * lora)}; each "
                     f"resume state ≈ {human_bytes(state)} (LoRA and optimizer moments in float32).")
    return errors, warnings, "\n\n".join(lines)
