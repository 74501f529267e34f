"""How a tab's handler runs an engine task: whose it is (the browser session) and where its progress shows."""

from __future__ import annotations

import functools

import gradio as gr

from engine.core.progress import ProgressFn
from engine.tasks import Task


def session_of(request: gr.Request | None) -> str:
    """The browser session a task belongs to: a tab's Stop button stops only that session's tasks."""
    return (request.session_hash or "") if request is not None else ""


def report_to(task: Task, progress) -> ProgressFn:
    """An on_progress for the engine that updates the job list (every page) and this page's progress bar."""
    def on_progress(fraction: float, message: str) -> None:
        task.on_progress(fraction, message)
        progress(fraction, desc=message)
    return on_progress


def waiting_note(progress):
    """An on_wait for a GPU task: this page's progress bar says what the task waits for and where to stop that."""
    def on_wait(message: str) -> None:
        progress(0.0, desc=f"{message[:1].upper()}{message[1:]} (the job list at the top can stop it)")
    return on_wait


def answer_people_errors(fn, outputs: int):
    """`fn` as an event handler whose gr.Error (a person's mistake, e.g. "The cut list is already empty.") is said in
    a toast and leaves every output as it was. Raised, it would cover each output with a red "Error" badge until
    closed, and print a traceback in the terminal."""
    @functools.wraps(fn)  # Gradio reads the wrapped signature: gr.Request and gr.Progress still reach fn
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as err:
            gr.Warning(err.message, title="Not done")
            return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs)) if outputs else None
    return handler
