"""What every tab shares: the project, the chosen models, the device, and the studio-wide GPU lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from engine.core.families import family_of
from engine.core.layout import Project
from engine.core.models import ModelChoice
from engine.jobs import GpuBusyError, JobRunner


@dataclass
class AppContext:
    project: Project
    models: ModelChoice
    device_description: str
    # Long tasks in child processes (training), and the studio-wide GPU lock: one GPU task at a time across the
    # studio (captioning, generation, training), AUTOMATIC1111's call queue idea.
    jobs: JobRunner
    # Components a tab offers to other tabs ("tabs" is the gr.Tabs itself), wired in each tab's optional connect(ctx).
    ui: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def gpu(self, description: str) -> Iterator[None]:
        """Hold the studio's GPU for in-process work (`description` names it to others, e.g. "captioning clips");
        gr.Error naming the holder while a training run or another task has it."""
        with ExitStack() as stack:
            try:
                stack.enter_context(self.jobs.gpu_slot(description))
            except GpuBusyError as err:
                raise gr.Error(str(err)) from err
            yield

    @contextmanager
    def gpu_work_paused(self, description: str) -> Iterator[None]:
        """No in-process GPU work starts while the body runs (unloading a model); gr.Error while some is running."""
        with ExitStack() as stack:
            try:
                stack.enter_context(self.jobs.gpu_work_paused(description))
            except GpuBusyError as err:
                raise gr.Error(f"{err} (Stop it first, then unload.)") from err
            yield


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
