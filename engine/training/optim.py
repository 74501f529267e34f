"""Optimizers (diffusion-pipe's names mapped to their nearest equivalents) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def build_optimizer(parameters: Sequence[torch.nn.Parameter], optimizer_cfg,
                    device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """diffusion-pipe's optimizer name -> our nearest equivalent, and a sentence saying which one was used."""
    kind = optimizer_cfg.type.lower()
    kwargs = dict(lr=optimizer_cfg.lr, betas=tuple(optimizer_cfg.betas), weight_decay=optimizer_cfg.weight_decay,
                  eps=optimizer_cfg.eps)
    if kind in ("adamw8bit", "adamw8bitkahan"):
        kahan = " (its Kahan summation is not available; LoRA weights stay float32 instead)" if "kahan" in kind else ""
        if device.type == "cuda":
            import bitsandbytes as bnb

            return (bnb.optim.AdamW8bit(list(parameters), **kwargs),
                    f"Optimizer {optimizer_cfg.type} -> bitsandbytes AdamW8bit{kahan}.")
        return (torch.optim.AdamW(list(parameters), **kwargs),
                f"Optimizer {optimizer_cfg.type} -> torch AdamW: bitsandbytes' 8-bit states need a CUDA GPU.")
    if kind == "adamw_optimi":
        return (torch.optim.AdamW(list(parameters), **kwargs),
                "Optimizer adamw_optimi -> torch AdamW (optimi is not installed; same update rule).")
    return torch.optim.AdamW(list(parameters), **kwargs), "Optimizer adamw -> torch AdamW."


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler {schedule!r}: use constant, linear or cosine.")
