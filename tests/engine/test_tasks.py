"""In-process tasks (engine.tasks): listed while they run, stopped per browser session or by id, and one GPU task at
a time, the next one waiting visibly (and stoppably) for the one before."""

from __future__ import annotations

import threading
import time

import pytest

from engine.jobs import GpuBusyError, JobRunner
from engine.tasks import TaskBoard, TaskStopped


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_tasks_are_listed_while_they_run_and_stopped_only_for_their_session():
    board = TaskBoard()
    with board.run("export", "exporting 2 clips", "page A") as mine, \
            board.run("analysis", "finding motion windows", "page B") as theirs:
        assert [t.id for t in board.active()] == [mine.id, theirs.id]
        assert board.stop_owned("page A", ("analysis",)) == []  # page A's Stop analysis: page B's runs on
        assert board.stop_owned("page A", ("export",)) == [mine]
        assert mine.should_stop() and mine.state == "stopping" and not theirs.should_stop()
        assert board.stop(theirs.id) is theirs and theirs.should_stop()
        version = board.version
    assert board.active() == [] and board.version == version + 2
    assert board.stop(mine.id) is None
    with pytest.raises(ValueError, match="kind must be one of"):
        with board.run("painting", "?"):
            pass


def test_a_gpu_task_waits_for_the_one_before_says_for_what_and_can_be_stopped_meanwhile():
    board = TaskBoard()
    heard, outcome = [], {}

    def second():
        try:
            with board.run("generation", "generating a video", "page B", gpu=True, on_wait=heard.append):
                outcome["ran"] = True
        except TaskStopped as err:
            outcome["stopped"] = str(err)

    with board.run("sweep", "generating a sweep of 4 variants", "page A", gpu=True):
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(lambda: any(t.state == "waiting" for t in board.active()))
        waiting = board.active()[1]
        assert waiting.waiting_for == "generating a sweep of 4 variants"
        assert heard == ["waiting for generating a sweep of 4 variants to finish"]
        with board.hold_gpu_idle() as idle:
            assert not idle  # e.g. Unload refuses while a GPU task runs
        board.stop(waiting.id)
        thread.join(10)
    assert outcome == {"stopped": "generating a video was stopped while waiting for generating a sweep of 4 "
                                  "variants."}

    thread = threading.Thread(target=second)
    with board.run("sweep", "generating a sweep of 4 variants", "page A", gpu=True):
        thread.start()
        wait_until(lambda: len(board.active()) == 2)
    thread.join(10)
    assert outcome.get("ran") and board.active() == []


def test_a_gpu_task_is_refused_while_training_holds_the_gpu(tmp_path):
    runner = JobRunner(tmp_path / "jobs", device="GPU")
    with JobRunner(tmp_path / "jobs", device="GPU").gpu_slot("training run 'x'"):
        with pytest.raises(GpuBusyError, match="training run 'x' is using the GPU"):
            with runner.tasks.run("captioning", "captioning clips", gpu=True):
                pass
    assert runner.tasks.active() == [] and not runner.tasks.gpu_busy()
