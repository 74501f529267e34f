"""Captions tab: the project's clips with their caption files."""

from __future__ import annotations

import gradio as gr

from studio.context import AppContext

TITLE = "Captions"


def build(ctx: AppContext) -> None:
    clips = ctx.project.list_clips()
    gr.Markdown(f"{len(clips)} clips in `{ctx.project.clips_dir}`")
