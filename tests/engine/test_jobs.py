"""The job runner with a fake child: a small Python script that prints JSON-line events and either stops gracefully
on SIGINT, ignores it (so it must be killed), or dies."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import pytest

from engine.jobs import (
    GpuBusyError,
    JobError,
    JobRunner,
    process_alive,
    process_start_ticks,
    training_argv,
)
from engine.training.events import EventFollower, LogEvent, PhaseEvent, StepEvent

FAKE_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time

    mode, steps = sys.argv[1], int(sys.argv[2])
    stop_request = sys.argv[3] if len(sys.argv) > 3 else None  # a file whose appearance means "stop"
    stop = False

    def emit(**event):
        print(json.dumps({"time": time.time(), **event}), flush=True)

    def on_sigint(signum, frame):
        global stop
        stop = True
        emit(event="log", message="got SIGINT")

    signal.signal(signal.SIGINT, signal.SIG_IGN if mode == "stubborn" else on_sigint)
    emit(event="phase", phase="train", message="training")
    print("plain log line, not an event", flush=True)
    print("loading 0%\\rloading 50%\\rloading 100%", flush=True)  # a progress bar redrawing its line
    step = 0
    while steps == 0 or step < steps:
        step += 1
        time.sleep(0.05)
        emit(event="step", step=step, max_steps=steps, epoch=1, loss=1.0 / step, lr=1e-4)
        if mode == "crash" and step == 2:
            print("RuntimeError: boom in step 2", file=sys.stderr, flush=True)
            sys.exit(3)
        if mode == "sigkill" and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop_request and os.path.exists(stop_request):
            stop = True
        if stop:
            emit(event="phase", phase="stopped", message="saved state")
            sys.exit(0)
    emit(event="phase", phase="done", message="finished")
""")


@pytest.fixture
def fake_child(tmp_path):
    script = tmp_path / "fake child.py"  # a space in the path on purpose
    script.write_text(FAKE_CHILD)
    return lambda mode, steps=0, *stop_request: [sys.executable, str(script), mode, str(steps), *map(str, stop_request)]


@pytest.fixture
def runner(tmp_path):
    return JobRunner(tmp_path / "state", device="GPU")


def wait_for_event(job, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    offset = 0
    while time.monotonic() < deadline:
        events, offset = job.read_events(offset)
        for event in events:
            if predicate(event):
                return event
        if not job.is_running():
            break
        job.wait(0.1)
    raise AssertionError("event not seen; log:\n" + "\n".join(job.log_tail(40)))


def test_events_stream_in_order_and_the_job_finishes(runner, fake_child, tmp_path):
    job = runner.start("fast run", fake_child("graceful", 5), cwd=tmp_path, run_dir=tmp_path / "runs" / "a b")
    events = list(job.follow())
    assert [e.KIND for e in events] == ["phase"] + ["step"] * 5 + ["phase"]
    assert [e.step for e in events if e.KIND == "step"] == [1, 2, 3, 4, 5]
    assert events[-1].phase == "done"
    status = job.status()
    assert status.state == "finished" and status.returncode == 0
    assert "plain log line, not an event" in job.log_tail()
    assert "loading 100%" in job.log_tail() and not any("loading 50%" in line for line in job.log_tail())
    record = json.loads((tmp_path / "runs" / "a b" / "job.json").read_text())
    assert record["argv"] == fake_child("graceful", 5) and record["pid"] == job.record.pid


def test_stop_is_graceful_when_the_child_listens(runner, fake_child, tmp_path):
    job = runner.start("endless", fake_child("graceful"), cwd=tmp_path, run_dir=tmp_path / "run")
    wait_for_event(job, lambda e: getattr(e, "step", None) == 2)
    started = time.monotonic()
    status = runner.stop(job, grace_s=20)
    assert time.monotonic() - started < 10
    assert status.state == "stopped", status
    events, _ = job.read_events()
    assert isinstance(events[-1], PhaseEvent) and events[-1].phase == "stopped"
    assert not job.is_running()


def test_a_child_that_watches_the_stop_request_stops_without_a_signal(runner, fake_child, tmp_path):
    from engine.core.layout import RunLayout

    run_dir = tmp_path / "run"
    request = RunLayout(run_dir).stop_request_file
    job = runner.start("watcher", fake_child("graceful", 0, request), cwd=tmp_path,
                       run_dir=run_dir, watches_stop_request=True)
    wait_for_event(job, lambda e: getattr(e, "step", None) == 2)
    assert runner.stop(job, grace_s=20).state == "stopped"
    events, _ = job.read_events()
    assert events[-1].phase == "stopped"
    signalled = any(isinstance(e, LogEvent) and e.message == "got SIGINT" for e in events)
    assert not signalled, "a multi-GPU launcher must not be signalled"
    restarted = runner.start("watcher", fake_child("graceful", 3, request), cwd=tmp_path,
                             run_dir=run_dir, watches_stop_request=True)
    restarted.wait(30)
    assert restarted.status().state == "finished", "a resumed run must not see the old stop request"


def test_an_unanswered_stop_request_falls_back_to_sigint(runner, fake_child, tmp_path):
    job = runner.start("deaf", fake_child("graceful"), cwd=tmp_path, run_dir=tmp_path / "run",
                       watches_stop_request=True)
    wait_for_event(job, lambda e: getattr(e, "step", None) == 2)
    assert runner.stop(job, grace_s=1).state == "stopped"
    events, _ = job.read_events()
    assert any(isinstance(e, LogEvent) and e.message == "got SIGINT" for e in events)


def test_stop_kills_the_group_when_the_child_ignores_sigint(runner, fake_child, tmp_path):
    job = runner.start("stubborn", fake_child("stubborn"), cwd=tmp_path, run_dir=tmp_path / "run")
    wait_for_event(job, lambda e: getattr(e, "step", None) == 1)
    started = time.monotonic()
    status = runner.stop(job, grace_s=1.0)
    assert 0.9 < time.monotonic() - started < 10
    assert status.state == "killed", status
    assert not job.is_running()
    assert not any(getattr(e, "phase", None) == "stopped" for e in job.read_events()[0])
    # the lock went with the group: in-process GPU work may run again
    with runner.gpu_slot("captioning"):
        pass


@pytest.mark.parametrize("mode, returncode, words", [("crash", 3, "exit code 3"), ("sigkill", -9, "SIGKILL")])
def test_a_dead_child_is_reported_with_its_last_output(runner, fake_child, tmp_path, mode, returncode, words):
    job = runner.start("doomed", fake_child(mode), cwd=tmp_path, run_dir=tmp_path / "run")
    assert job.wait(30)
    status = job.status()
    assert status.state == "failed" and status.returncode == returncode
    assert words in status.message
    assert any('"step": 2' in line for line in status.log_tail)
    if mode == "crash":
        assert status.log_tail[-1] == "RuntimeError: boom in step 2"


def test_a_restarted_studio_reattaches_to_the_running_job(tmp_path, fake_child):
    state = tmp_path / "state"
    first = JobRunner(state)
    job = first.start("long run", fake_child("graceful"), cwd=tmp_path, run_dir=tmp_path / "runs" / "long")
    wait_for_event(job, lambda e: getattr(e, "step", None) == 2)
    del first, job  # the studio goes away; the job does not

    second = JobRunner(state)
    found = second.current()
    assert found is not None and found.name == "long run" and found.is_running()
    assert found.run_dir == (tmp_path / "runs" / "long").resolve()
    events, offset = found.read_events()
    assert [e.step for e in events if e.KIND == "step"][:2] == [1, 2]
    more, _ = found.read_events(offset)
    assert all(e.step > events[-1].step for e in more if e.KIND == "step")
    assert second.stop(found, grace_s=20).state == "stopped"

    third = JobRunner(state)
    assert third.current() is None
    ended = third.attach(tmp_path / "runs" / "long")
    assert ended.status().state == "stopped"
    assert third.attach(tmp_path / "runs" / "never ran") is None


def test_one_gpu_job_at_a_time(runner, fake_child, tmp_path):
    job = runner.start("gpu run", fake_child("graceful"), cwd=tmp_path, run_dir=tmp_path / "one",
                       description="training run 'gpu run'")
    try:
        with pytest.raises(GpuBusyError, match="training run 'gpu run' is using the GPU"):
            runner.start("second", fake_child("graceful", 1), cwd=tmp_path, run_dir=tmp_path / "two")
        with pytest.raises(GpuBusyError, match="is using the GPU"):
            with JobRunner(runner.state_dir, device="GPU").gpu_slot("captioning"):
                pass
        with runner.gpu_work_paused("unloading the captioner"):  # a job holds the GPU: no work of ours can run
            pass
        with pytest.raises(JobError, match="already running"):
            runner.start("again", fake_child("graceful", 1), cwd=tmp_path, run_dir=tmp_path / "one", kind="cpu")
        cpu_job = runner.start("cpu work", fake_child("graceful", 1), cwd=tmp_path, run_dir=tmp_path / "three",
                               kind="cpu")
        assert cpu_job.wait(30) and cpu_job.status().state == "finished"
    finally:
        runner.stop(job, grace_s=20)
    with runner.gpu_slot("captioning"):
        assert runner.gpu_holder()["description"] == "captioning"
        with pytest.raises(GpuBusyError, match="captioning is using the GPU"):
            runner.start("blocked", fake_child("graceful", 1), cwd=tmp_path, run_dir=tmp_path / "four")
    assert runner.gpu_holder() is None
    cpu_only = JobRunner(runner.state_dir, device="CPU")
    with cpu_only.gpu_slot("captioning"):  # a machine without a GPU: the lock still guards one job, named right
        assert cpu_only.busy_message().startswith("captioning is using the CPU;")


def test_active_jobs_list_training_and_tasks_and_stop_either(runner, fake_child, tmp_path):
    job = runner.start("listed", fake_child("graceful", 400), cwd=tmp_path, run_dir=tmp_path / "listed",
                       description="training run 'listed'")
    try:
        wait_for_event(job, lambda e: isinstance(e, StepEvent) and e.step >= 2)
        with runner.tasks.run("export", "exporting 3 clips", "session A") as task:
            task.on_progress(0.5, "clip 2 of 3")
            training, export = runner.active_jobs()
            assert (training.kind, training.description, training.state) == ("training", "training run 'listed'",
                                                                             "running")
            assert 0 < training.fraction < 1 and training.message.startswith("epoch 1, step ")
            assert (export.id, export.owner, export.fraction, export.message) == (task.id, "session A", 0.5,
                                                                                 "clip 2 of 3")
            assert runner.stop_active(task.id) == "Stopping exporting 3 clips..." and task.should_stop()
        assert [j.kind for j in runner.active_jobs()] == ["training"]
        assert runner.stop_active(task.id) == "That job has already ended."
        assert runner.stop_active(training.id).startswith("Stopping training run 'listed'")
        assert job.wait(30) and runner.attach(job.run_dir).status().state == "stopped"
        assert runner.active_jobs() == []
    finally:
        runner.stop(job, grace_s=20)


def test_in_process_gpu_work_takes_turns_through_the_same_lock(runner):
    """Captioning and generation in the studio's process: one slot at a time, from any thread, and a model is not
    unloaded under running work."""
    import threading

    refused = []
    with runner.gpu_slot("captioning clips"):
        def other_thread():
            try:
                with runner.gpu_slot("generating a video"):
                    pass
            except GpuBusyError as err:
                refused.append(str(err))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        with pytest.raises(GpuBusyError, match="captioning clips is using the GPU; try again when it has finished"):
            with runner.gpu_work_paused("unloading the captioner"):
                pass
    assert refused == ["captioning clips is using the GPU; try again when it has finished."]
    with runner.gpu_work_paused("unloading the captioner"):
        assert runner.gpu_holder()["description"] == "unloading the captioner"
    with runner.gpu_slot("generating a video"):
        pass


def test_a_resumed_job_reads_only_its_own_output(runner, fake_child, tmp_path):
    run_dir = tmp_path / "run"
    runner.start("first", fake_child("graceful", 2), cwd=tmp_path, run_dir=run_dir).wait(30)
    second = runner.start("resumed", fake_child("graceful", 1), cwd=tmp_path, run_dir=run_dir)
    events = list(second.follow())
    assert [e.step for e in events if e.KIND == "step"] == [1]
    assert second.status().state == "finished"


def test_process_identity_uses_the_start_time():
    ticks = process_start_ticks(os.getpid())
    assert ticks and process_alive(os.getpid(), ticks)
    assert not process_alive(os.getpid(), ticks + 1)


def test_json_lines_reader_leaves_a_torn_line_for_later(tmp_path):
    from engine.core.files import read_json_lines_since

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "step", "step": 1}\nnot json\n{"event": "step", "st')
    records, offset = read_json_lines_since(path, 0)
    assert records == [{"event": "step", "step": 1}]
    follower = EventFollower(path)
    assert len(follower.refresh()) == 1
    with open(path, "a") as f:
        f.write('ep": 2}\n')
    assert [r.step for r in follower.refresh()] == [1, 2]
    assert read_json_lines_since(path, offset)[0] == [{"event": "step", "step": 2}]


def test_training_command_is_an_argument_list(tmp_path):
    config = tmp_path / "it's a run" / "run.toml"
    assert training_argv(config, resume=True) == [sys.executable, "-m", "engine.training", "--config", str(config),
                                                   "--resume"]
    multi = training_argv(config, num_gpus=2)
    assert multi[:4] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus"]
    assert multi[-4:] == ["--module", "engine.training", "--config", str(config)]


def test_a_group_killed_from_outside_is_reported_and_frees_the_gpu(runner, fake_child, tmp_path):
    job = runner.start("external kill", fake_child("stubborn"), cwd=tmp_path, run_dir=tmp_path / "run")
    wait_for_event(job, lambda e: getattr(e, "step", None) == 1)
    os.killpg(job.record.pid, signal.SIGKILL)  # e.g. the system's out-of-memory killer takes the whole group
    assert job.wait(10)
    assert job.status().state == "died"
    with runner.gpu_slot("generation"):
        pass


def test_a_run_is_summarized_from_its_files(tmp_path):
    from engine.core.files import append_jsonl
    from engine.core.layout import RunLayout
    from engine.training.events import read_events
    from engine.training.runs import summarize_run

    run_dir = tmp_path / "runs" / "r 1"
    for epoch in (1, 2, 10):
        (run_dir / f"epoch{epoch}").mkdir(parents=True)
        (run_dir / f"epoch{epoch}" / "adapter_model.safetensors").write_bytes(b"x")
    (run_dir / "epochs-notes").mkdir()  # not a LoRA folder
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "epoch1.mp4").write_bytes(b"x")
    metrics = run_dir / "metrics.jsonl"
    for t, event in enumerate([
        {"event": "phase", "phase": "train", "message": ""},
        {"event": "step", "step": 1, "max_steps": 4, "epoch": 1, "loss": 0.5, "lr": 1e-4},
        {"event": "sample", "epoch": 1, "step": 1, "path": "samples/epoch1.mp4"},
        {"event": "sample", "epoch": 2, "step": 2, "path": str(run_dir / "samples" / "gone.mp4")},
        {"event": "step", "step": 2, "max_steps": 4, "epoch": 2, "loss": 0.25, "lr": 1e-4},
        {"event": "phase", "phase": "stopped", "message": "saved"},
    ]):
        append_jsonl(metrics, {**event, "time": 100.0 + 10 * t})
    run = RunLayout(run_dir)
    assert [e for e, _ in run.loras()] == [1, 2, 10]  # numeric order, not text order
    summary = summarize_run(run, read_events(metrics), job=None)
    assert (summary.name, summary.state, summary.step, summary.max_steps, summary.epoch) == ("r 1", "stopped", 2, 4, 2)
    assert summary.final_loss == 0.25 and summary.duration_s == 50.0
    assert summary.samples == [(1, run_dir / "samples" / "epoch1.mp4")]  # a sample file that is gone is left out

    append_jsonl(metrics, {"event": "error", "message": "CUDA out of memory.", "hint": "Raise blocks_to_swap.",
                           "time": 200.0})
    append_jsonl(metrics, {"event": "phase", "phase": "error", "message": "CUDA out of memory.", "time": 200.0})
    failed = summarize_run(run, read_events(metrics), job=None)
    assert failed.state == "failed" and "Raise blocks_to_swap." in failed.message
    assert summarize_run(RunLayout(tmp_path / "empty"), [], job=None).state == "not started"


def test_a_resumed_run_does_not_show_the_last_runs_final_phase(runner, fake_child, tmp_path):
    """Right after Resume the run is running; the "stopped" phase its previous job wrote is not its phase."""
    from engine.core.files import append_jsonl
    from engine.core.layout import RunLayout
    from engine.training.events import read_events
    from engine.training.runs import summarize_run

    run = RunLayout(tmp_path / "resumed")
    run.root.mkdir()
    append_jsonl(run.metrics_file, {"event": "phase", "phase": "stopped", "message": "saved",
                                    "time": time.time() - 60})
    job = runner.start("resumed", fake_child("graceful"), cwd=tmp_path, run_dir=run.root)
    try:
        summary = summarize_run(run, read_events(run.metrics_file), job)
        assert (summary.state, summary.phase) == ("running", None)
    finally:
        runner.stop(job, grace_s=20)


def test_the_job_lasts_until_the_workers_of_a_dead_launcher_have_saved(runner, fake_child, tmp_path):
    """Like `deepspeed`/`torchrun` on Ctrl-C: the launcher dies at once, its worker finishes its step and saves."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen({fake_child("graceful")!r})
        time.sleep(3600)  # dies of the SIGINT (KeyboardInterrupt) while the worker goes on
    """))
    job = runner.start("launched", [sys.executable, str(launcher)], cwd=tmp_path, run_dir=tmp_path / "run")
    wait_for_event(job, lambda e: getattr(e, "step", None) == 2)
    status = runner.stop(job, grace_s=20)
    assert status.state == "stopped", status
    events, _ = job.read_events()
    assert events[-1].KIND == "phase" and events[-1].phase == "stopped"  # the worker was not killed
