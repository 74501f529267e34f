"""Optimizers (diffusion-pipe's names mapped to their nearest equivalents) and its learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.training.schema import ADAMW_EQUIVALENTS, OPTIMIZER_TYPES


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
    if kind in ADAMW_EQUIVALENTS:
        return (torch.optim.AdamW(list(parameters), **kwargs),
                f"Optimizer {optimizer_cfg.type} -> torch AdamW ({ADAMW_EQUIVALENTS[kind]}).")
    if kind != "adamw":  # engine.training.stages.validate refuses these before anything is loaded
        raise ValueError(f"optimizer.type {optimizer_cfg.type!r}: the studio trains with {', '.join(OPTIMIZER_TYPES)}.")
    return torch.optim.AdamW(list(parameters), **kwargs), "Optimizer adamw -> torch AdamW."


# diffusion-pipe's CosineAnnealingLR floor (train.py: eta_min=1e-6), an absolute learning rate.
COSINE_FLOOR_LR = 1e-6


def learning_rate(step: int, *, lr: float, warmup_steps: int, schedule_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based), as diffusion-pipe's train.py schedules it.

    Warm-up: torch LinearLR from lr / warmup_steps, rising by (lr - lr / warmup_steps) / warmup_steps per step; then
    (SequentialLR) `schedule` counted from the end of warm-up over `schedule_steps` (diffusion-pipe's epochs x steps
    per epoch, also when max_steps stops earlier): 'constant'; 'linear' (LinearLR to 0); 'cosine'
    (CosineAnnealingLR down to 1e-6). Raises ValueError for another schedule.
    """
    if step < warmup_steps:
        start = 1 / warmup_steps
        return lr * (start + (1 - start) * step / warmup_steps)
    done = step - warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1 - min(done, schedule_steps) / schedule_steps)
    if schedule == "cosine":
        return COSINE_FLOOR_LR + (lr - COSINE_FLOOR_LR) * (1 + math.cos(math.pi * done / schedule_steps)) / 2
    raise ValueError(f"lr_scheduler {schedule!r}: use constant, linear or cosine.")


def optimizer_record(optimizer: torch.optim.Optimizer, optimizer_cfg) -> dict:
    """What a resume state records of its optimizer: the class that owns its moments and the run file's settings."""
    return {"class": _class_name(optimizer), "type": optimizer_cfg.type, "lr": optimizer_cfg.lr,
            "betas": list(optimizer_cfg.betas), "eps": optimizer_cfg.eps, "weight_decay": optimizer_cfg.weight_decay}


def resume_optimizer(optimizer: torch.optim.Optimizer, optimizer_cfg, saved_state: dict,
                     saved_record: dict | None) -> list[str]:
    """Load a saved optimizer state, then apply the run file's settings where they changed since it was saved.

    torch's load_state_dict brings back the saved betas, eps and weight decay: a change in the run file before a
    resume would be ignored silently. Returns one sentence per setting that changed (the learning rate is set every
    step from the run file, so its change is only reported). Raises ValueError when the optimizer itself changed
    (its saved moments do not fit another optimizer).
    """
    if saved_record and saved_record.get("class") != _class_name(optimizer):
        raise ValueError(f"The saved state was trained with [optimizer] type = '{saved_record.get('type')}' "
                         f"({saved_record.get('class')}); the run file now asks for '{optimizer_cfg.type}' "
                         f"({_class_name(optimizer)}), whose state cannot continue from it.")
    optimizer.load_state_dict(saved_state)
    notes = []
    wanted = {"betas": tuple(optimizer_cfg.betas), "eps": optimizer_cfg.eps, "weight_decay": optimizer_cfg.weight_decay}
    for name, value in wanted.items():
        before = optimizer.param_groups[0].get(name)
        if before is None or (tuple(before) if name == "betas" else before) == value:
            continue
        for group in optimizer.param_groups:
            group[name] = value
        notes.append(f"Optimizer {name} changed in the run file: {_shown(before)} in the saved state, "
                     f"{_shown(value)} from now on.")
    if saved_record and saved_record.get("lr") != optimizer_cfg.lr:
        notes.append(f"Optimizer lr changed in the run file: {saved_record.get('lr')} in the saved state, "
                     f"{optimizer_cfg.lr} from now on (the schedule continues from the current step).")
    return notes


def _class_name(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _shown(value) -> str:
    return str(list(value)) if isinstance(value, (tuple, list)) else f"{value:g}"
