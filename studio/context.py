"""What every tab shares: the project, the chosen models, the device, and the studio's job runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.core.families import family_of
from engine.core.layout import Project
from engine.core.models import ModelChoice
from engine.jobs import JobRunner


@dataclass
class AppContext:
    project: Project
    models: ModelChoice
    device_description: str
    # Every long task: training in a child process, and (on `jobs.tasks`) the in-process ones (captioning,
    # generation, sweeps, export, analysis). Holds the studio-wide GPU lock: one GPU task at a time.
    jobs: JobRunner
    # Components a tab offers to other tabs ("tabs" is the gr.Tabs itself), wired in each tab's optional connect(ctx).
    ui: dict[str, Any] = field(default_factory=dict)
    # What each tab re-reads from disk (tab title -> (fn, inputs, outputs)): studio.app runs it when the tab is
    # selected and when a job ends or a run saves a LoRA, so no page ever needs a reload.
    refreshers: dict[str, tuple[Any, list, list]] = field(default_factory=dict)

    def wan_model(self) -> str:
        """The Wan folder (or hub id) this project trains and generates with: the project's choice, else the
        studio's."""
        return self.project.settings().wan_model or self.models.wan

    def wan_models(self) -> dict[str, str]:
        """A Wan folder per model family the studio knows (engine.core.families key -> folder), the project's own
        choice winning over the studio's folder of the same family."""
        folders: dict[str, str] = {}
        for folder in (self.models.wan22, self.models.wan, self.project.settings().wan_model):
            if folder:
                folders[family_of(folder).key] = folder
        return folders
