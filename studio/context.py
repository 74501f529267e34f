"""What every tab shares: the project, the chosen models, the device, and the studio-wide job lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from engine.core.layout import Project
from engine.core.models import ModelChoice
from engine.jobs import JobRunner


@dataclass
class AppContext:
    project: Project
    models: ModelChoice
    device_description: str
    # One GPU job at a time across the studio (captioning, generation, training): AUTOMATIC1111's call queue idea.
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)
    # Components a tab offers to other tabs ("tabs" is the gr.Tabs itself), wired in each tab's optional connect(ctx).
    ui: dict[str, Any] = field(default_factory=dict)
    # Long tasks in child processes (training); holds the studio-wide GPU file lock that in-process GPU work
    # (captioning, generation) also takes with `jobs.gpu_slot(...)`, so they wait or say "training is using the GPU".
    jobs: JobRunner | None = None
