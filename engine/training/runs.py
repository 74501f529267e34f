"""Training runs on disk: the run's LoRAs by epoch and a summary of its events and job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.jobs import Job
from engine.training.events import ErrorEvent, Event, PhaseEvent, SampleEvent, StepEvent, last_of

# --- training runs --------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"


RUN_TOML = "run.toml"


DATASET_TOML = "dataset.toml"


_PHASE_STATES = {"done": "finished", "stopped": "stopped", "error": "failed"}


@dataclass
class RunSummary:
    """One training run as its folder tells it: for the runs list and the live view."""

    name: str
    run_dir: Path
    state: str  # a JobStatus state, or from the last phase event when the run has no job record
    message: str
    phase: str | None = None
    step: int | None = None
    max_steps: int | None = None
    epoch: int | None = None
    final_loss: float | None = None
    duration_s: float | None = None
    loras: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, adapter_model.safetensors)
    samples: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, mp4)


def run_loras(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The LoRA files a run has written, by epoch: runs/<run>/epochN/adapter_model.safetensors."""
    found = []
    for path in Path(run_dir).glob("epoch*/adapter_model.safetensors"):
        number = path.parent.name.removeprefix("epoch")
        if number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def summarize_run(run_dir: str | os.PathLike, events: list[Event], job: Job | None) -> RunSummary:
    """What a run did, from its events (metrics.jsonl), its files and its job record (if the studio started it)."""
    run_dir = Path(run_dir)
    last_step = last_of(events, StepEvent)
    last_phase = getattr(last_of(events, PhaseEvent), "phase", None)
    if job is not None:
        status = job.status(tail_lines=0)
        state, message = status.state, status.message
        if state in ("finished", "stopped", "failed") and last_phase in _PHASE_STATES:
            state = _PHASE_STATES[last_phase]  # the trainer's own last word: e.g. "done" although a stop came late
    else:
        state = _PHASE_STATES.get(last_phase, "incomplete" if events else "not started")
        message = f"{run_dir.name}: {state}"
    error = last_of(events, ErrorEvent)
    if state == "failed" and error:
        message = f"{message} {error.message} {error.hint}".strip()
    times = [e.time for e in events if e.time]
    samples = []
    for event in events:
        if isinstance(event, SampleEvent) and event.path:
            path = Path(event.path)
            path = path if path.is_absolute() else run_dir / path
            if path.exists():
                samples.append((event.epoch or 0, path))
    return RunSummary(
        name=run_dir.name, run_dir=run_dir, state=state, message=message, phase=last_phase,
        step=last_step and last_step.step, max_steps=last_step and last_step.max_steps,
        epoch=last_step and last_step.epoch, final_loss=last_step and last_step.loss,
        duration_s=(max(times) - min(times)) if len(times) > 1 else None,
        loras=run_loras(run_dir), samples=samples)


# --- the loss curve -------------------------------------------------------------------------------------------

EMA_WEIGHT = 0.9  # smoothing of the loss curve (TensorBoard's default)


@dataclass
class LossCurve:
    """Loss (raw and EMA-smoothed) and learning rate by step, for plotting."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def thinned(self, points: int) -> LossCurve:
        """At most about `points` evenly spaced steps, always keeping the last."""
        if not self.steps:
            return self
        stride = max(1, len(self.steps) // points)
        keep = list(range(0, len(self.steps), stride))
        if keep[-1] != len(self.steps) - 1:
            keep.append(len(self.steps) - 1)
        return LossCurve(*([values[i] for i in keep] for values in (self.steps, self.loss, self.smoothed, self.lr)))


def loss_curve(events: list[Event]) -> LossCurve:
    """The run's loss by step, the last value winning where a resume repeated steps; the smoothed curve is a
    bias-corrected EMA (weight EMA_WEIGHT), so it starts at the first loss instead of rising from 0."""
    by_step = {e.step: e for e in events if isinstance(e, StepEvent) and e.loss is not None}
    steps = sorted(by_step)
    loss = [by_step[s].loss for s in steps]
    smoothed, average = [], 0.0
    for i, value in enumerate(loss, start=1):
        average = EMA_WEIGHT * average + (1 - EMA_WEIGHT) * value
        smoothed.append(average / (1 - EMA_WEIGHT ** i))
    return LossCurve(steps, loss, smoothed, [by_step[s].lr or 0.0 for s in steps])
