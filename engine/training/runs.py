"""Training runs on disk: the run folder written from the settings, and read back (a summary of its events, files
and job; its loss curve)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.core.layout import RunLayout
from engine.jobs import Job
from engine.training.config import save_dataset_config, save_run_config
from engine.training.events import (
    ErrorEvent,
    Event,
    PhaseEvent,
    SampleEvent,
    StepEvent,
    last_of,
)
from engine.training.form import apply_overrides
from engine.training.schema import DatasetConfig, RunConfig

# --- training runs --------------------------------------------------------------------------------------------

def write_run_folder(run: RunLayout, run_cfg: RunConfig, dataset_cfg: DatasetConfig) -> Path:
    """Save run.toml and dataset.toml into the run folder, the run writing into that folder (output_dir ".") and
    reading dataset.toml beside it; returns run.toml."""
    run_cfg = apply_overrides(run_cfg, {"output_dir": ".", "dataset": run.dataset_toml.name})
    run.root.mkdir(parents=True, exist_ok=True)
    save_dataset_config(dataset_cfg, run.dataset_toml)
    return save_run_config(run_cfg, run.run_toml)


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
    loras: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, adapter_model.safetensors or pair folder)
    samples: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, mp4)


def summarize_run(run: RunLayout, events: list[Event], job: Job | None) -> RunSummary:
    """What a run did, from its events (metrics.jsonl), its files and its job record (if the studio started it)."""
    run_dir = run.root
    last_step = last_of(events, StepEvent)
    # a resumed run: the final phase of its previous job ("stopped") is not this job's
    phases = [e for e in events if isinstance(e, PhaseEvent) and (job is None or (e.time or 0) >= job.record.started)]
    last_phase = phases[-1].phase if phases else None
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
        loras=run.loras(), samples=samples)


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
