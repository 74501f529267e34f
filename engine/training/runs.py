"""Training runs on disk: the run's LoRAs by epoch and a summary of its events and job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.jobs import Job

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


def summarize_run(run_dir: str | os.PathLike, events: list[dict], job: Job | None) -> RunSummary:
    """What a run did, from its events (metrics.jsonl), its files and its job record (if the studio started it)."""
    run_dir = Path(run_dir)
    steps = [e for e in events if e.get("event") == "step"]
    phases = [e for e in events if e.get("event") == "phase"]
    last_step = steps[-1] if steps else {}
    last_phase = phases[-1].get("phase") if phases else None
    if job is not None:
        status = job.status(tail_lines=0)
        state, message = status.state, status.message
        if state in ("finished", "stopped", "failed") and last_phase in _PHASE_STATES:
            state = _PHASE_STATES[last_phase]  # the trainer's own last word: e.g. "done" although a stop came late
    else:
        state = _PHASE_STATES.get(last_phase, "incomplete" if events else "not started")
        message = f"{run_dir.name}: {state}"
    errors = [e for e in events if e.get("event") == "error"]
    if state == "failed" and errors:
        message = f"{message} {errors[-1].get('message', '')} {errors[-1].get('hint', '')}".strip()
    times = [e["time"] for e in events if isinstance(e.get("time"), (int, float))]
    samples = []
    for event in events:
        if event.get("event") == "sample" and event.get("path"):
            path = Path(event["path"])
            path = path if path.is_absolute() else run_dir / path
            if path.exists():
                samples.append((int(event.get("epoch", 0)), path))
    return RunSummary(
        name=run_dir.name, run_dir=run_dir, state=state, message=message, phase=last_phase,
        step=last_step.get("step"), max_steps=last_step.get("max_steps"), epoch=last_step.get("epoch"),
        final_loss=last_step.get("loss"), duration_s=(max(times) - min(times)) if len(times) > 1 else None,
        loras=run_loras(run_dir), samples=samples)
