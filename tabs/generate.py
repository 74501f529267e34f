"""Generate tab: image-to-video outputs of the project."""

from __future__ import annotations

import gradio as gr

from studio.context import AppContext

TITLE = "Generate"


def build(ctx: AppContext) -> None:
    gr.Markdown(f"Outputs are written to `{ctx.project.outputs_dir}`")
