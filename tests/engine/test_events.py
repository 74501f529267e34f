"""The trainer -> UI event contract without a browser: every kind survives the trip through a JSON line, and
metrics.jsonl files of other studio versions load."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from engine.core.layout import RunLayout
from engine.training.events import (
    EVENT_TYPES,
    ErrorEvent,
    EventLog,
    LogEvent,
    PhaseEvent,
    ProgressEvent,
    SampleEvent,
    SaveEvent,
    StepEvent,
    UnknownEvent,
    parse_event,
    parse_line,
    read_events,
)
from engine.training.parallel import World

EXAMPLES = [
    PhaseEvent(time=1.5, phase="train", message="Training 6 steps from step 0 on 1 x cpu."),
    LogEvent(time=2.0, message="Optimizer 'adamw_optimi' is torch AdamW."),
    ProgressEvent(time=3.0, phase="cache", fraction=0.25, message="1 of 4 items (1 files encoded)"),
    StepEvent(time=4.0, step=3, max_steps=6, epoch=2, loss=0.125, lr=5e-4, steps_per_s=1.5, eta_s=2.0,
              gpu_mem_gib=19.6, expert="high_noise"),
    SaveEvent(time=5.0, kind="lora", epoch=2, step=3, path="/runs/r/epoch2/high_noise_model.safetensors",
              expert="high_noise"),
    SampleEvent(time=6.0, epoch=2, step=3, path="samples/epoch2.mp4"),
    ErrorEvent(time=7.0, message="The disk is full: could not write /runs/r/state.", hint="Free some space.", rank=1),
]


def test_every_kind_round_trips_through_a_json_line():
    assert {type(e) for e in EXAMPLES} == set(EVENT_TYPES.values())  # a new kind must be added here
    for event in EXAMPLES:
        for spec in fields(event):  # every field set to something other than its default, so the trip is seen
            assert getattr(event, spec.name) not in (None, "", 0), (type(event).__name__, spec.name)
        line = json.dumps(event.to_json())
        assert json.loads(line)["event"] == event.KIND
        assert parse_line(line) == event
        assert parse_line(line.encode()) == event  # as read from the job log's bytes


def test_the_event_log_writes_what_readers_get_back(tmp_path, capsys):
    run = RunLayout(tmp_path / "runs" / "r")
    log = EventLog(run, World())
    single_process = [e for e in EXAMPLES if not isinstance(e, (StepEvent, ErrorEvent))]
    single_process.append(ErrorEvent(time=8.0, message="no clips", hint="add clips"))
    for event in single_process:
        log.emit(event)
    log.close()
    assert read_events(run.metrics_file) == single_process
    printed = [parse_line(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == single_process  # stdout (the job log) carries the same events
    assert "rank" not in json.loads(run.metrics_file.read_text().splitlines()[-1])

    ranked = EventLog(None, World(rank=1, world_size=2))  # a failing rank says which it is; others stay quiet
    ranked.emit(LogEvent(message="rank 1 note"))
    ranked.emit(ErrorEvent(time=9.0, message="out of memory"))
    assert [parse_line(line) for line in capsys.readouterr().out.splitlines()] == [
        ErrorEvent(time=9.0, message="out of memory", rank=1)]


def test_lines_of_other_versions_load(tmp_path):
    """Missing fields take defaults, unknown fields and kinds are kept out of the way, junk lines are skipped."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([
        '{"event": "phase", "time": 10, "phase": "train", "message": "go"}',
        '{"event": "step", "time": 11, "step": 1, "max_steps": 4, "epoch": 1, "loss": 0.5, "lr": 0.0001}',  # no rate
        '{"event": "step", "time": 12.5, "step": 2.0, "loss": 0.4, "grad_norm": 1.5, "lr": null}',  # newer field
        '{"event": "validation", "time": 13, "loss": 0.3, "note": "held-out clips"}',  # a kind from the future
        '{"event": "save", "kind": "lora", "epoch": "one", "path": "epoch1"}',  # no time, a hand-edited epoch
        '{"step": 3}',  # JSON, but not an event
        '[1, 2]',
        "Traceback (most recent call last):",
        '{"event": "log", "message": "torn',
    ]))
    events = read_events(metrics)
    assert events[:2] == [PhaseEvent(time=10.0, phase="train", message="go"),
                          StepEvent(time=11.0, step=1, max_steps=4, epoch=1, loss=0.5, lr=1e-4)]
    assert events[2] == StepEvent(time=12.5, step=2, loss=0.4)
    assert isinstance(events[2].step, int) and events[2].steps_per_s is None
    assert events[3] == UnknownEvent(time=13.0, kind_name="validation", fields={"loss": 0.3, "note": "held-out clips"})
    assert events[3].describe() == "[validation] held-out clips"
    assert events[4] == SaveEvent(time=0.0, kind="lora", epoch=None, path="epoch1")
    assert len(events) == 5
    assert parse_event({"event": 3}) is None and parse_event("step") is None


def test_loss_curve_keeps_the_last_value_of_a_repeated_step_and_smooths_from_the_first():
    from engine.training.runs import loss_curve

    events = [StepEvent(step=s, loss=loss, lr=1e-3 * s)
              for s, loss in [(1, 1.0), (2, 3.0), (3, 9.0), (2, 2.0), (3, 1.0)]]  # resumed after step 1
    events.append(PhaseEvent(phase="train"))
    curve = loss_curve(events)
    assert curve.steps == [1, 2, 3] and curve.loss == [1.0, 2.0, 1.0]
    assert curve.smoothed[0] == 1.0  # bias-corrected EMA starts at the first loss
    assert 1.0 < curve.smoothed[1] < 2.0
    assert curve.lr == pytest.approx([1e-3, 2e-3, 3e-3])
    assert loss_curve([]).steps == []
    long = loss_curve([StepEvent(step=s, loss=1.0) for s in range(1, 1002)]).thinned(100)
    assert len(long.steps) <= 102 and long.steps[0] == 1 and long.steps[-1] == 1001
