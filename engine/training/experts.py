"""The experts a run trains: one LoRA per transformer of the model family, each on the noise levels it owns.

Wan 2.1 has one transformer; Wan 2.2 I2V A14B has a high-noise and a low-noise expert switched at a boundary
(engine.core.families). `[model] min_t` / `max_t` (diffusion-pipe's keys) give the noise levels trained; each expert
whose range meets them gets a LoRA, an optimizer and a gradient stepper of its own, so one run trains both experts,
or one alone (min_t = boundary: high-noise; max_t = boundary: low-noise, as diffusion-pipe's per-expert runs).

Routing: every optimizer step belongs to one expert, drawn from a generator seeded by (seed, step) with the
probability that a sampled t falls in that expert's range; the step's micro-batches then draw their t within that
range. So every sampled t goes to the expert that owns it and the t distribution is the configured one, every rank
trains the same expert at a step (data parallel stays exact), and a resumed run continues identically. Only the
active expert needs the GPU: the other's frozen weights wait in pinned CPU memory (engine.speed.parking).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from engine.core.families import Expert, ModelFamily
from engine.training.events import TrainingError
from engine.training.objective import TimestepSampling


@dataclass(frozen=True)
class ExpertPlan:
    """An expert trained by a run and the noise levels t it is trained on, [low, high)."""

    expert: Expert
    t_range: tuple[float, float]
    lr: float  # peak learning rate of this expert's LoRA


def plan_experts(run_cfg, family: type[ModelFamily], boundary: float | None) -> list[ExpertPlan]:
    """The experts whose noise ranges meet [min_t, max_t], with their ranges and learning rates.

    Raises TrainingError when the range is empty or meets no expert.
    """
    min_t, max_t = run_cfg.model.min_t, run_cfg.model.max_t
    if not min_t < max_t:
        raise TrainingError(f"[model] min_t = {min_t} is not below max_t = {max_t}: no noise level left to train.",
                            "Set 0 <= min_t < max_t <= 1 (0 and 1 train every noise level).")
    plans = []
    for expert in family.experts:
        low, high = expert.t_range(boundary)
        low, high = max(low, min_t), min(high, max_t)
        if high > low:
            lr = getattr(run_cfg.studio, f"{expert.name}_lr", None)
            plans.append(ExpertPlan(expert, (low, high), run_cfg.optimizer.lr if lr is None else lr))
    return plans


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that picks optimizer step `step`'s expert: a function of (seed, step) only."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:expert:{step}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(mixed)


def choose_expert(plans: list[ExpertPlan], sampling: TimestepSampling, seed: int, step: int) -> int:
    """Index into `plans` of the expert that trains optimizer step `step`: the owner of a t drawn from the run's
    distribution over all trained ranges."""
    if len(plans) == 1:
        return 0
    low = min(p.t_range[0] for p in plans)
    high = max(p.t_range[1] for p in plans)
    t = float(sampling.sample(1, step_generator(seed, step), (low, high))[0])
    for index, plan in enumerate(plans):
        if plan.t_range[0] <= t < plan.t_range[1]:
            return index
    return max(range(len(plans)), key=lambda i: plans[i].t_range[1])  # t == high exactly


@dataclass
class ExpertSlot:
    """An expert while training: its plan, LoRA-wrapped transformer, optimizer, stepper and CPU parking."""

    plan: ExpertPlan
    trainable: Any  # engine.training.model.TrainableTransformer
    parking: Any = None  # engine.speed.parking.ModelParking
    optimizer: torch.optim.Optimizer | None = None
    stepper: Any = None
    prefix: str = ""  # resume-state key prefix: '' for a one-transformer family, 'high_noise.' ...

    @property
    def name(self) -> str:
        return self.plan.expert.name


def activate(slots: list[ExpertSlot], index: int) -> ExpertSlot:
    """Park every other expert in CPU memory, then bring expert `index` onto the GPU."""
    for i, slot in enumerate(slots):
        if i != index and slot.parking is not None:
            slot.parking.park()
    slot = slots[index]
    if slot.parking is not None:
        slot.parking.unpark()
    return slot
