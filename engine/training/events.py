"""The trainer -> UI contract: typed events, written as JSON lines and read back through this module.

The trainer (rank 0, and any rank that fails) writes every event as one JSON object per line, to stdout (the job
log, engine.jobs) and to runs/<run>/metrics.jsonl. Each line is `{"event": <kind>, "time": <unix s>, ...fields}`:

    phase     phase, message           a stage began or the run ended: validate | cache | train | done | stopped | error
    log       message                  a note for people (which optimizer a diffusion-pipe name became, a warning)
    progress  phase, fraction, message caching progress: fraction 0..1 of the clips
    step      step, max_steps, epoch,  an optimizer step (every steps_per_print and the last): loss averaged over
              loss, lr, steps_per_s,   ranks and micro-batches, lr after warmup/schedule, steps_per_s since this
              eta_s, gpu_mem_gib,      process started, eta_s in seconds, peak GPU memory in GiB (null on the CPU),
              expert                   Wan 2.2: the expert the step trained, high_noise | low_noise (else null)
    save      kind, epoch, step, path, kind "lora" (epochN/ or stepS/ adapter) or "state" (state/stepS/, to resume);
              expert                   Wan 2.2: the expert a LoRA file belongs to (else null)
    sample    epoch, step, path        a sample video rendered with the LoRA in memory
    error     message, hint, rank      what went wrong and what to do; rank only under a multi-GPU launcher

A run ends with a phase event of done, stopped or error. Readers (engine.jobs, the Train tab, engine.training.runs)
call `parse_event` / `read_events` and never look at keys themselves. Reading is lenient, so the metrics.jsonl of an
older studio always loads: a missing field takes its default, an unknown field is dropped, an unknown kind becomes an
`UnknownEvent`, and a line that is not an event object is skipped. Adding a field with a default, or a new kind, is
compatible; renaming or removing one is not.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from engine.core.files import append_jsonl, read_json_lines_since

if TYPE_CHECKING:
    from engine.core.layout import RunLayout
    from engine.training.parallel import World


class TrainingError(RuntimeError):
    """A failure to report as an "error" event: `message` says what went wrong, `hint` what to do."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 2):
        super().__init__(message)
        self.hint, self.exit_code = hint, exit_code


# ====================================================================================================== the events

@dataclass(frozen=True, kw_only=True)
class Event:
    """One trainer event; `KIND` is its "event" value on the wire."""

    KIND: ClassVar[str] = ""
    time: float = field(default_factory=time.time)  # unix seconds

    def to_json(self) -> dict[str, Any]:
        return {"event": self.KIND, **asdict(self)}

    def describe(self) -> str:
        """The event as one line for people: `[kind] field field ...` (its words, no numbers)."""
        words = [str(getattr(self, name)) for name in ("phase", "kind", "message", "path", "hint")
                 if getattr(self, name, None)]
        return f"[{self.KIND}] " + " ".join(words)


@dataclass(frozen=True, kw_only=True)
class PhaseEvent(Event):
    KIND: ClassVar[str] = "phase"
    phase: str = ""  # validate | cache | train | done | stopped | error
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class LogEvent(Event):
    KIND: ClassVar[str] = "log"
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class ProgressEvent(Event):
    KIND: ClassVar[str] = "progress"
    phase: str = "cache"
    fraction: float = 0.0  # 0..1
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    KIND: ClassVar[str] = "step"
    step: int = 0  # optimizer steps done (1-based)
    max_steps: int | None = None
    epoch: int | None = None  # the epoch this step's micro-batches came from (1-based)
    loss: float | None = None  # mean over micro-batches and ranks
    lr: float | None = None
    steps_per_s: float | None = None  # since this process started (a resume starts the count again)
    eta_s: float | None = None  # seconds to max_steps at that rate
    gpu_mem_gib: float | None = None  # peak allocated on this rank's GPU; None on the CPU
    expert: str | None = None  # Wan 2.2: the expert this step trained ('high_noise' or 'low_noise')


@dataclass(frozen=True, kw_only=True)
class SaveEvent(Event):
    KIND: ClassVar[str] = "save"
    kind: str = ""  # "lora" or "state"
    epoch: int | None = None
    step: int | None = None
    path: str = ""
    expert: str | None = None  # Wan 2.2: the expert a LoRA file belongs to


@dataclass(frozen=True, kw_only=True)
class SampleEvent(Event):
    KIND: ClassVar[str] = "sample"
    epoch: int | None = None
    step: int | None = None
    path: str = ""  # absolute, or relative to the run folder


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    KIND: ClassVar[str] = "error"
    message: str = ""
    hint: str = ""
    rank: int | None = None  # set only under a multi-GPU launcher: the rank that failed

    def to_json(self) -> dict[str, Any]:
        record = super().to_json()
        if self.rank is None:  # single-process runs write no rank (as they always did)
            del record["rank"]
        return record


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Event):
    """A line of a kind this version does not know (a newer trainer): kept whole, shown as it is."""

    kind_name: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind_name, "time": self.time, **self.fields}

    def describe(self) -> str:
        return f"[{self.kind_name}] " + " ".join(str(v) for v in self.fields.values() if isinstance(v, str) and v)


EVENT_TYPES: dict[str, type[Event]] = {cls.KIND: cls for cls in (
    PhaseEvent, LogEvent, ProgressEvent, StepEvent, SaveEvent, SampleEvent, ErrorEvent)}


def parse_event(record: Any) -> Event | None:
    """The event a decoded JSON line holds, or None if it is not an event (plain log output that happens to be JSON).

    Missing fields take their defaults and unknown fields are dropped, so older and newer lines load; a field of the
    wrong type (a hand-edited file) is dropped too rather than crash a reader later."""
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    kind = record["event"]
    when = record.get("time")
    when = float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else 0.0
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        return UnknownEvent(time=when, kind_name=kind,
                            fields={k: v for k, v in record.items() if k not in ("event", "time")})
    values = {}
    for spec in fields(cls):
        if spec.name == "time" or spec.name not in record:
            continue
        value = _typed(record[spec.name], spec.type)
        if value is not _WRONG:
            values[spec.name] = value
    return cls(time=when, **values)


_WRONG = object()


def _typed(value: Any, annotation: str) -> Any:
    """`value` as the field's type (annotations are strings here: `from __future__ import annotations`)."""
    optional = annotation.endswith("| None")
    base = annotation.split("|")[0].strip()
    if value is None:
        return None if optional else _WRONG
    if isinstance(value, bool):
        return _WRONG
    if base == "str":
        return value if isinstance(value, str) else _WRONG
    if base == "int":
        return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else _WRONG
    if base == "float":
        return float(value) if isinstance(value, (int, float)) else _WRONG
    return _WRONG


def parse_line(line: str | bytes) -> Event | None:
    """The event on one line of the job log or metrics.jsonl; None for plain text or a torn line."""
    line = line.strip()
    if not line.startswith(b"{" if isinstance(line, bytes) else "{"):
        return None
    try:
        return parse_event(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_events_since(path: str | Path, offset: int) -> tuple[list[Event], int]:
    """The events of the complete lines appended to `path` after byte `offset`, and the offset to read on from."""
    records, offset = read_json_lines_since(path, offset)
    return [event for event in map(parse_event, records) if event is not None], offset


def read_events(path: str | Path) -> list[Event]:
    """Every event in a metrics.jsonl (or a job log); [] when the file does not exist."""
    return read_events_since(path, 0)[0]


class EventFollower:
    """All events of a growing metrics.jsonl, parsing only what was appended since the last call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.events: list[Event] = []

    def refresh(self) -> list[Event]:
        """Read what is new; returns all events so far."""
        new, offset = read_events_since(self.path, self.offset)
        if offset < self.offset:  # file rewritten: start over
            self.events = []
        self.events.extend(new)
        self.offset = offset
        return self.events


def last_of(events: list[Event], kind: type[Event]) -> Any:
    """The last event of a type, or None."""
    return next((e for e in reversed(events) if isinstance(e, kind)), None)


# ================================================================================================== the writer

class EventLog:
    """Writes events as JSON lines on stdout + metrics.jsonl, and TensorBoard scalars. Only rank 0 writes, except
    errors: a rank that fails says so itself (tagged with its rank), since rank 0 may not know why the others
    stopped."""

    def __init__(self, run: RunLayout | None, world: World):
        self.run, self.world = run, world  # no run (config unreadable): stdout only
        self._tensorboard = None

    def emit(self, event: Event) -> Event:
        if isinstance(event, ErrorEvent) and self.world.distributed:
            event = ErrorEvent(time=event.time, message=event.message, hint=event.hint, rank=self.world.rank)
        if self.world.is_main or isinstance(event, ErrorEvent):
            record = event.to_json()
            print(json.dumps(record, ensure_ascii=False), flush=True)
            if self.run is None:
                return event
            append_jsonl(self.run.metrics_file, record)
            if isinstance(event, StepEvent):
                self._scalars(event)
        return event

    def phase(self, phase: str, message: str) -> None:
        self.emit(PhaseEvent(phase=phase, message=message))

    def log(self, message: str) -> None:
        """A note for people reading the log (e.g. which optimizer a diffusion-pipe name became)."""
        self.emit(LogEvent(message=message))

    def _scalars(self, event: StepEvent) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # scalars stay in metrics.jsonl; TensorBoard is a convenience
                self._tensorboard = False
                self.log("TensorBoard is not installed: metrics go to metrics.jsonl only.")
                return
            self._tensorboard = SummaryWriter(str(self.run.tensorboard_dir))
        if self._tensorboard is False:
            return
        for name in ("loss", "lr", "steps_per_s"):
            self._tensorboard.add_scalar(f"train/{name}", getattr(event, name), event.step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
