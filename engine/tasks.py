"""Long work that runs inside the studio's own process (captioning, generation, sweeps, clip export, motion analysis),
listed beside the child-process jobs of engine.jobs so every page sees every running job, with its progress, and can
stop it.

Each task belongs to the browser session that started it (`owner`): a tab's Stop button stops only its own session's
tasks (`TaskBoard.stop_owned`), while the studio's job list stops any task by id (`TaskBoard.stop`). A task that
needs the GPU waits, visibly and stoppably, for the in-process GPU lock (one GPU task at a time: AUTOMATIC1111's call
queue idea) and then takes the studio-wide GPU file lock that training holds (`JobRunner.gpu_slot`).
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

TASK_KINDS = ("captioning", "generation", "sweep", "export", "analysis")
WAIT_WAKE_S = 0.5  # while waiting for the GPU, how often a task checks whether it was asked to stop


class TaskStopped(RuntimeError):
    """A task was stopped while it waited for the GPU; nothing was done."""


@dataclass
class Task:
    """One running (or waiting) in-process task: what it is, whose it is, how far it got."""

    id: str
    kind: str  # one of TASK_KINDS
    description: str  # for people, e.g. "generating a sweep"
    owner: str  # the browser session that started it ("" when none)
    started: float  # time.time()
    uses_gpu: bool = False
    waiting_for: str | None = None  # what holds the GPU while this task waits for it
    fraction: float = 0.0
    message: str = ""
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def state(self) -> str:
        if self.stop_event.is_set():
            return "stopping"
        return "waiting" if self.waiting_for else "running"

    def on_progress(self, fraction: float, message: str) -> None:
        """An engine `on_progress` callback: keeps the latest fraction (0..1) and message for the job list."""
        self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), message

    def should_stop(self) -> bool:
        """An engine `should_stop` callback."""
        return self.stop_event.is_set()


@dataclass
class ActiveJob:
    """A running job of either kind (a child-process training run or an in-process task), as every page lists it."""

    id: str  # a task's id, or "training:<run folder>"
    kind: str  # "training" or one of TASK_KINDS
    description: str
    owner: str  # the browser session that started it ("" for training: a run belongs to the project)
    state: str  # running | waiting | stopping
    fraction: float | None  # 0..1, None when unknown
    message: str
    started: float


class TaskBoard:
    """The running in-process tasks of one studio, and its in-process GPU lock.

    `gpu_slot(description)` is the cross-process GPU lock to take once the in-process one is held (a context
    manager raising engine.jobs.GpuBusyError while training holds the GPU); None skips it.
    """

    def __init__(self, gpu_slot: Callable[[str], AbstractContextManager] | None = None):
        self._gpu_slot = gpu_slot
        self._lock = threading.Lock()
        self._gpu_lock = threading.Lock()
        self._gpu_task: Task | None = None
        self._tasks: dict[str, Task] = {}
        self._ids = itertools.count(1)
        self.version = 0  # goes up whenever a task ends: pages showing what tasks write refresh then

    def active(self) -> list[Task]:
        """Running and waiting tasks, oldest first."""
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.started)

    def stop(self, task_id: str) -> Task | None:
        """Ask one task to stop (it ends at its next check); returns it, or None when it has already ended."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is not None:
            task.stop_event.set()
        return task

    def stop_owned(self, owner: str, kinds: tuple[str, ...]) -> list[Task]:
        """Ask the tasks of these kinds that `owner` started to stop; other sessions' tasks run on."""
        with self._lock:
            tasks = [t for t in self._tasks.values() if t.owner == owner and t.kind in kinds]
        for task in tasks:
            task.stop_event.set()
        return tasks

    def gpu_busy(self) -> bool:
        return self._gpu_lock.locked()

    @contextmanager
    def hold_gpu_idle(self) -> Iterator[bool]:
        """True (and the GPU held) when no GPU task runs now, e.g. to unload a model safely; False otherwise."""
        acquired = self._gpu_lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                self._gpu_lock.release()

    @contextmanager
    def run(self, kind: str, description: str, owner: str = "", *, gpu: bool = False,
            on_wait: Callable[[str], None] | None = None) -> Iterator[Task]:
        """Register a task for the duration of the block; with `gpu`, first wait for the GPU (the task's state is
        "waiting", its `waiting_for` names the holder and `on_wait(message)` hears whenever that changes;
        TaskStopped if stopped while waiting), then hold the studio-wide GPU lock too (GpuBusyError while a training
        run holds it)."""
        if kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}, not {kind!r}")
        task = Task(id=f"{kind}-{next(self._ids)}", kind=kind, description=description, owner=owner,
                    started=time.time(), uses_gpu=gpu)
        with self._lock:
            self._tasks[task.id] = task
        try:
            if not gpu:
                yield task
                return
            self._wait_for_gpu(task, on_wait)
            try:
                self._gpu_task = task
                with self._gpu_slot(description) if self._gpu_slot else nullcontext():
                    yield task
            finally:
                self._gpu_task = None
                self._gpu_lock.release()
        finally:
            with self._lock:
                self._tasks.pop(task.id, None)
                self.version += 1

    def _wait_for_gpu(self, task: Task, on_wait: Callable[[str], None] | None) -> None:
        if self._gpu_lock.acquire(blocking=False):
            return
        while True:
            holder = self._gpu_task
            waiting_for = holder.description if holder else "another task"
            if waiting_for != task.waiting_for:
                task.waiting_for, task.message = waiting_for, f"waiting for {waiting_for} to finish"
                if on_wait:
                    on_wait(task.message)
            if task.should_stop():
                raise TaskStopped(f"{task.description} was stopped while waiting for {task.waiting_for}.")
            if self._gpu_lock.acquire(timeout=WAIT_WAKE_S):
                task.waiting_for, task.message = None, ""
                return
