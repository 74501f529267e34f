"""Train tab: runs of the project."""

from __future__ import annotations

import gradio as gr

from studio.context import AppContext

TITLE = "Train"


def build(ctx: AppContext) -> None:
    runs = ctx.project.list_runs()
    gr.Markdown(f"{len(runs)} runs in `{ctx.project.runs_dir}`")
