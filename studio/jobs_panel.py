"""The studio's job list, above the tabs on every page: each running job (training, captioning, generation, sweep,
export, analysis) with its progress and whose page started it, and a Stop that works from any page.

It also notices when a job ends or a training run saves a LoRA, and tells the tabs to re-read what they show
(`changes`, a per-page gr.State whose change event studio.app wires to every tab's refresher).
"""

from __future__ import annotations

import html
import time

import gradio as gr

from engine.tasks import ActiveJob
from studio.context import AppContext

TICK_S = 1.0
KIND_WORDS = {"training": "Training", "captioning": "Captions", "generation": "Generate", "sweep": "Generate",
              "export": "Clips", "analysis": "Clips"}


def jobs_html(jobs: list[ActiveJob], session: str) -> str:
    """The job list for one page; `session` marks the jobs this page started."""
    if not jobs:
        return '<div id="studio-jobs-list" class="studio-jobs-empty">No jobs running.</div>'
    rows = []
    for job in jobs:
        whose = "this page" if job.owner and job.owner == session else "another page" if job.owner else "project"
        bar = (f'<progress value="{job.fraction:.3f}" max="1"></progress> {job.fraction:.0%}'
               if job.fraction is not None else "")
        started = time.strftime("%H:%M:%S", time.localtime(job.started))
        rows.append(f'<tr data-job="{html.escape(job.id)}"><td><b>{html.escape(job.description)}</b></td>'
                    f"<td>{KIND_WORDS.get(job.kind, job.kind)} tab · {whose}</td><td>{html.escape(job.state)}</td>"
                    f"<td>{bar}</td><td>{html.escape(job.message)}</td><td>since {started}</td></tr>")
    return f'<div id="studio-jobs-list"><table class="studio-jobs">{"".join(rows)}</table></div>'


def changes_mark(ctx: AppContext, jobs: list[ActiveJob]) -> tuple:
    """What, when it differs from last time, means the tabs should re-read the disk: a task ended, a training run
    started, ended or saved a LoRA."""
    loras = sum(1 for _ in ctx.project.runs_dir.glob("*/epoch*/adapter_model.safetensors"))
    return ctx.jobs.tasks.version, tuple(j.id for j in jobs if j.kind == "training"), loras


def build(ctx: AppContext) -> gr.State:
    """The panel's widgets and events; returns the `changes` state tabs refresh on."""
    with gr.Group(elem_id="studio-jobs"):
        listing = gr.HTML(jobs_html([], ""), elem_id="studio-jobs-box")
        with gr.Row(visible=False, elem_id="studio-jobs-controls") as controls:
            choice = gr.Dropdown([], label="Running job", scale=4, elem_id="studio-jobs-choice")
            stop = gr.Button("Stop job", variant="stop", scale=1, elem_id="studio-jobs-stop")
    shown = gr.State(None)  # what this page shows already: unchanged parts are not sent again
    changes = gr.State(changes_mark(ctx, ctx.jobs.active_jobs()))
    timer = gr.Timer(TICK_S)

    def tick(seen, request: gr.Request):
        jobs = ctx.jobs.active_jobs()
        text = jobs_html(jobs, request.session_hash or "")
        options = [(f"{j.description} ({j.state})", j.id) for j in jobs]
        mark = changes_mark(ctx, jobs)
        if seen == [text, options]:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), mark
        return (text, gr.Dropdown(choices=options, value=options[0][1] if options else None),
                gr.Row(visible=bool(jobs)), [text, options], mark)

    def stop_job(job_id: str | None) -> None:
        if not job_id:
            raise gr.Error("Choose a running job first.")
        gr.Info(ctx.jobs.stop_active(job_id))

    # Ticks and stops never wait behind long work in the queue.
    timer.tick(tick, [shown], [listing, choice, controls, shown, changes], show_progress="hidden",
               concurrency_limit=None)
    stop.click(stop_job, [choice], None, concurrency_limit=None)
    return changes
