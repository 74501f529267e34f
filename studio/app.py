"""build(ctx) -> gr.Blocks: a header (project, models, device) and the four tabs in workflow order."""

from __future__ import annotations

import html

import gradio as gr

from studio.context import AppContext
from tabs import captions, clips, generate, train

TABS = (clips, captions, train, generate)  # the workflow's order: cut, caption, train, try


def header_html(ctx: AppContext) -> str:
    items = {
        "Project": f"{ctx.project.name} ({ctx.project.root})",
        "Wan model": ctx.models.wan,
        "Captioner": ctx.models.captioner,
        "Video captioner": ctx.models.video_captioner,
        "Device": ctx.device_description,
    }
    cells = "".join(
        f'<span class="studio-header-item"><b>{html.escape(k)}:</b> <code>{html.escape(v)}</code></span>'
        for k, v in items.items()
    )
    return f'<div id="studio-header"><h2>Wan LoRA Studio</h2>{cells}</div>'


def build(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Wan LoRA Studio") as app:
        gr.HTML(header_html(ctx))
        with gr.Tabs() as tabs:
            for tab in TABS:
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower()):
                    tab.build(ctx)
        ctx.ui["tabs"] = tabs
        # Cross-tab wiring (e.g. Train's "open in Generate") runs once every tab's components exist.
        for tab in TABS:
            if hasattr(tab, "connect"):
                tab.connect(ctx)
    return app
