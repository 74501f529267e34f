"""The progress and stop callbacks every long engine function takes (`on_progress`, `should_stop`), as in
diffusers' step callbacks: the UI, a command line and a test drive them alike."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]
"""on_progress(fraction in 0..1, message for people)."""

StopFn = Callable[[], bool]
"""should_stop() -> True once the caller wants the work to end early."""


def no_progress(fraction: float, message: str) -> None:
    """An on_progress that reports nowhere."""


def never_stop() -> bool:
    """A should_stop that never asks to stop."""
    return False
