"""Clips tab: the project's source videos and the training clips cut from them."""

from __future__ import annotations

import gradio as gr

from studio.context import AppContext

TITLE = "Clips"


def build(ctx: AppContext) -> None:
    sources = ctx.project.list_sources()
    source = gr.Dropdown([str(p) for p in sources], value=str(sources[0]) if sources else None,
                         label="Source video", interactive=True)
    gr.Video(value=str(sources[0]) if sources else None, label="Preview", interactive=False)
    del source
