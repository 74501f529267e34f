"""Presets per GPU size (24, 48, 80 GB) and the CPU demo, as run and dataset settings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from engine.core.families import family_of
from engine.core.hardware import GpuInfo, list_gpus
from engine.core.models import wan_transformer_config
from engine.training.form import apply_overrides
from engine.training.schema import ConfigError, DatasetConfig, DirectoryConfig, RunConfig

# ------------------------------------------------------------------------------------------------------ presets

# Tuning constants for the GPU presets (bench/RESULTS.md): 480x832x81 with float8 matmuls + CPU-offloaded checkpoints
# + 34 swapped blocks fits a cap of 22 GiB *reserved* memory (room for a 24 GB card's CUDA context), Wan 2.1 21.9 GiB
# at 16.2 s/step and Wan 2.2 22.0 GiB at 16.0 s/step on an H200 (bench/wan22.py, 2026-11-30; 28 blocks ran out of
# memory there); float8 matmuls + selective checkpointing + compiled blocks peak at 54.2 GiB (9.25 s/step, H100).
GPU24_BLOCKS_TO_SWAP = 34


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


def recommended_preset(model_path: str, gpus: list[GpuInfo] | None = None) -> str:
    """The preset for this model and machine (`gpus`: this machine's, by default): the CPU demo for a tiny model
    (transformer narrower than 1024) or no GPU, else by the smallest GPU's memory."""
    transformer = wan_transformer_config(model_path) or {}
    heads, head_dim = transformer.get("num_attention_heads"), transformer.get("attention_head_dim")
    width = heads * head_dim if heads and head_dim else None  # a hub id: decide by the hardware alone
    gpus = list_gpus() if gpus is None else gpus
    if not gpus or (width is not None and width < 1024):
        return PRESET_CPU_DEMO
    smallest = min(g.total_gib for g in gpus)
    return PRESET_80GB if smallest >= 70 else PRESET_48GB if smallest >= 40 else PRESET_24GB


def presets() -> dict[str, dict[str, Any]]:
    """Preset name -> RunConfig overrides ({dotted.key: value}), in the order the Train tab lists them."""
    return {name: dict(values) for name, values in _RUN_PRESETS.items()}


def dataset_presets() -> dict[str, dict[str, Any]]:
    """Preset name -> DatasetConfig overrides."""
    return {name: dict(values) for name, values in _DATASET_PRESETS.items()}


def preset_configs(name: str, *, clips_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   model_path: str | os.PathLike,
                   dataset_file: str = "dataset.toml") -> tuple[RunConfig, DatasetConfig]:
    """A complete run + dataset config for a preset: train on `clips_dir`, write to `output_dir`, with the model
    family's training shift (engine.core.families: Wan 2.2 trains both experts, its noise levels as it samples them).

    `dataset_file` is stored as written in the run TOML (relative = beside the run TOML, as the studio saves them).
    For a project: `preset_configs(name, clips_dir=project.clips_dir, output_dir=project.run_dir(run),
    model_path=project's model)`.
    """
    if name not in _RUN_PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; allowed values: {', '.join(_RUN_PRESETS)}.")
    run = RunConfig(output_dir=str(Path(output_dir)), dataset=dataset_file)
    run.model.ckpt_path = str(model_path)
    shift = family_of(model_path).training_shift  # Wan 2.2's presets train both experts with its sampling shift
    run = apply_overrides(run, {**_RUN_PRESETS[name], **({"model.shift": shift} if shift != 1.0 else {})})
    dataset = DatasetConfig(directory=[DirectoryConfig(path=str(Path(clips_dir)))])
    dataset = apply_overrides(dataset, _DATASET_PRESETS[name])
    return run, dataset
