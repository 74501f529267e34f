"""The one runner for long tasks (training): a child process in its own process group, its JSON-line events, a
graceful stop, and a record on disk so a restarted studio re-attaches to a running or finished job.

Each job lives in a folder of its own (a run's folder, `runs/<run>/`):

    job.json        the record: name, argv, cwd, pid and process start time, log offset, stop/kill marks
    job.log         the child's stdout and stderr (JSON lines are events; everything else is log text)
    job-exit.json   written by the supervisor when the child exits: return code, end time

The child's output goes to a file, never a pipe to the studio, so a studio that is restarted (or dies) does not take
the job with it. A small supervisor (`python -m engine.jobs`) leads the process group: it starts the real command,
records how it exited, and holds the studio-wide GPU lock (an fcntl lock on `<state_dir>/gpu.lock`) for exactly as
long as the job lives, so the lock is released even when nobody is watching.

In-process work (captioning, generation, sweeps, clip export, analysis) runs as tasks on `JobRunner.tasks`
(engine.tasks); a GPU task takes the same lock with `JobRunner.gpu_slot(...)`, which refuses with
`GpuBusyError("training run 'x' is using the GPU ...")` or waits, as the caller chooses. `JobRunner.active_jobs()`
lists both kinds for any page, and `JobRunner.stop_active(...)` stops either. A trainer started from a terminal
takes the lock too (`JobRunner.hold_gpu`); one started by JobRunner finds GPU_LOCK_HELD_ENV naming the lock its
supervisor already holds for it. `exclusive_folder` keeps a second trainer out of a run folder, naming the first one's
pid.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from engine.core.files import atomic_write_json
from engine.core.layout import RunLayout
from engine.tasks import ActiveJob, TaskBoard
from engine.training.events import Event, PhaseEvent, ProgressEvent, StepEvent, parse_event, read_events_since

GPU_LOCK_FILE = "gpu.lock"


GPU_HOLDER_FILE = "gpu-holder.json"


GPU_LOCK_HELD_ENV = "WAN_STUDIO_GPU_LOCK_HELD"  # set for a job's command: the path of the GPU lock held for it


FOLDER_LOCK_FILE = ".lock"  # in a run folder: held by the one trainer writing there


RUNNING_STATES = ("running", "stopping")


class GpuBusyError(RuntimeError):
    """Another job holds the studio's GPU; the message says which and what to do."""


class JobError(RuntimeError):
    """A job could not be started or found; the message says why."""


class FolderBusyError(RuntimeError):
    """Another process holds a folder's lock; the message names it and its pid."""


@contextmanager
def exclusive_folder(folder: str | os.PathLike, description: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (an fcntl lock on folder/FOLDER_LOCK_FILE, recording `description` and this
    pid) while the block runs. The kernel drops the lock when the process dies, however it ends.

    Raises FolderBusyError naming the holder and its pid when another process holds it.
    """
    lock = Path(folder) / FOLDER_LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):  # the holder is between taking the lock and writing its name
            holder = {}
        raise FolderBusyError(f"{folder} is in use by {holder.get('description', 'another process')} (pid "
                              f"{holder.get('pid', 'unknown')}); stop it first, or wait for it to finish.") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"description": description, "pid": os.getpid()}).encode())
        yield
    finally:
        os.close(fd)


# --- processes -------------------------------------------------------------------------------------------------

def process_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22); None if gone or a zombie.

    A pid plus its start time names one process for good: pids are reused, start times are not.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    state, start_ticks = fields[0], fields[19]
    return None if state in ("Z", "X") else int(start_ticks)


def process_alive(pid: int, start_ticks: int) -> bool:
    return process_start_ticks(pid) == start_ticks


def wait_for_exit(pid: int, start_ticks: int, timeout: float | None) -> bool:
    """Block until the process exits (True) or `timeout` seconds pass (False), without polling (a pidfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not process_alive(pid, start_ticks):  # checked after opening: the pidfd may not name a reused pid
            return True
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable) or not process_alive(pid, start_ticks)
    finally:
        os.close(pidfd)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


# --- jobs ------------------------------------------------------------------------------------------------------

SIGNAL_GRACE_S = 30.0  # after an unanswered stop request, how long SIGINT gets before the group is killed


@dataclass
class JobRecord:
    """What a restarted studio needs to find a job again; stored as job.json in the job's folder."""

    name: str
    kind: str  # "gpu" jobs hold the studio's GPU lock while they live; "cpu" jobs don't
    argv: list[str]
    cwd: str
    run_dir: str
    log_offset: int  # where this job's output starts in job.log (a resumed run appends to the same log)
    pid: int  # the supervisor's pid, which is also the process group id
    start_ticks: int
    started: float  # time.time()
    stop_requested: float | None = None
    killed: bool = False  # the group had to be killed after the grace period
    watches_stop_request: bool = False  # the child checks its run's stop-request file: stop() asks there


@dataclass
class JobStatus:
    """How a job stands, in words for people as well as fields for code."""

    state: str  # running | stopping | finished | stopped | failed | killed | died
    message: str
    returncode: int | None = None
    signal_name: str | None = None
    started: float | None = None
    ended: float | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


class Job:
    """A started or re-attached job; all state comes from its folder, so any number of Job objects may watch one."""

    def __init__(self, record: JobRecord):
        self.record = record

    @property
    def run_dir(self) -> Path:
        return Path(self.record.run_dir)

    @property
    def files(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def log_path(self) -> Path:
        return self.files.job_log

    @property
    def name(self) -> str:
        return self.record.name

    def is_running(self) -> bool:
        return process_alive(self.record.pid, self.record.start_ticks)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (True) or `timeout` seconds pass (False)."""
        return wait_for_exit(self.record.pid, self.record.start_ticks, timeout)

    def exit_info(self) -> dict | None:
        try:
            return json.loads(self.files.job_exit_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def read_events(self, offset: int = 0) -> tuple[list[Event], int]:
        """Events (engine.training.events) this job printed after byte `offset` of its log, and the next offset."""
        return read_events_since(self.log_path, max(offset, self.record.log_offset))

    def follow(self, offset: int = 0, *, should_stop: Callable[[], bool] | None = None,
               wake_s: float = 0.5) -> Iterator[Event]:
        """Yield events as the job prints them, until it ends (or `should_stop()`); sleeps on the process meanwhile."""
        while True:
            running = self.is_running()
            events, offset = self.read_events(offset)
            yield from events
            if not running or (should_stop and should_stop()):
                return
            self.wait(wake_s)  # wakes at once when the job exits

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines of this job's output (events included), for showing what went wrong."""
        if lines <= 0:
            return []
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self.record.log_offset, size - 64 * 1024)
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        # progress bars redraw a line with carriage returns: keep what the line finally showed
        shown = (line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n"))
        return [line for line in shown if line.strip()][-lines:]

    def status(self, tail_lines: int = 20) -> JobStatus:
        record = self.record
        if self.is_running():
            if record.stop_requested:
                return JobStatus("stopping", f"{record.name}: stopping (finishing the current step and saving)",
                                 started=record.started)
            return JobStatus("running", f"{record.name}: running", started=record.started)
        tail = self.log_tail(tail_lines)
        exit_info = self.exit_info()
        if exit_info is None:
            if record.killed:
                return JobStatus("killed", f"{record.name} did not stop within the grace period and was killed; "
                                 "Resume continues from its last saved state.", started=record.started,
                                 log_tail=tail)
            return JobStatus("died", f"{record.name} ended without recording how (its supervisor was killed from "
                             "outside the studio, or the machine restarted). Last output below.",
                             started=record.started, log_tail=tail)
        code, ended = exit_info["returncode"], exit_info.get("ended")
        common = dict(returncode=code, started=record.started, ended=ended, log_tail=tail)
        stop_signals = (signal.SIGINT, signal.SIGTERM)
        if code == 0 or (record.stop_requested and -code in stop_signals):  # a child without a stop handler dies
            if record.stop_requested:
                return JobStatus("stopped", f"{record.name} stopped; Resume continues from its last saved state.",
                                 **common)
            return JobStatus("finished", f"{record.name} finished.", **common)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-code}"
            hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
            return JobStatus("failed", f"{record.name} was killed by {name}{hint}. Last output below.",
                             signal_name=name, **common)
        return JobStatus("failed", f"{record.name} failed with exit code {code}. Last output below.", **common)


class JobRunner:
    """Starts, stops and finds jobs; `state_dir` holds the studio-wide GPU lock (use one per studio home).

    `device` is the word the busy message uses for what the lock guards ("GPU", or "CPU" on a machine without one;
    default: asked of torch when first needed).
    """

    def __init__(self, state_dir: str | os.PathLike, device: str | None = None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._device = device
        self.tasks = TaskBoard(gpu_slot=self.gpu_slot)

    @property
    def device(self) -> str:
        if self._device is None:  # asked late: engine.core.hardware imports torch, which the supervisor never needs
            from engine.core.hardware import list_gpus

            self._device = "GPU" if list_gpus() else "CPU"
        return self._device

    @property
    def lock_path(self) -> Path:
        return self.state_dir / GPU_LOCK_FILE

    @property
    def holder_path(self) -> Path:
        return self.state_dir / GPU_HOLDER_FILE

    # GPU lock
    def _try_lock(self, wait: bool = False) -> int | None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def gpu_holder(self) -> dict | None:
        """Who holds the GPU ({"description", "pid", "run_dir", ...}), or None when it is free."""
        try:
            holder = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return holder if process_alive(holder["pid"], holder["start_ticks"]) else None

    def busy_message(self) -> str:
        holder = self.gpu_holder()
        device = self.device
        if holder is None:
            return f"another job is using the {device}; wait for it to finish or stop it in the job list at the top."
        if holder["pid"] == os.getpid():  # in-process work of this studio (captioning, generation)
            return f"{holder['description']} is using the {device}; try again when it has finished."
        return (f"{holder['description']} is using the {device} (pid {holder['pid']}); wait for it to finish or stop "
                "it in the job list at the top.")

    @contextmanager
    def gpu_slot(self, description: str, wait: bool = False) -> Iterator[None]:
        """Hold the studio's GPU for in-process work; while a job or other in-process work (another thread: each slot
        opens the lock file anew, and flock locks of separate opens exclude each other) has it, raise GpuBusyError
        naming the holder (or block, with `wait`)."""
        fd = self._try_lock(wait=wait)
        if fd is None:
            raise GpuBusyError(self.busy_message())
        pid = os.getpid()
        try:
            atomic_write_json(self.holder_path, {"description": description, "pid": pid,
                                                 "start_ticks": process_start_ticks(pid), "run_dir": None})
            yield
        finally:
            holder = self.gpu_holder()
            if holder and holder["pid"] == pid and holder["description"] == description:
                self.holder_path.unlink(missing_ok=True)
            os.close(fd)

    @contextmanager
    def hold_gpu(self, description: str) -> Iterator[None]:
        """Hold the studio's GPU for this whole process (a trainer), unless the job supervisor that started it holds
        it already (GPU_LOCK_HELD_ENV names this lock): then taking it again would refuse our own job."""
        held = os.environ.get(GPU_LOCK_HELD_ENV)
        if held and Path(held).resolve() == self.lock_path.resolve():
            yield
            return
        with self.gpu_slot(description):
            yield

    @contextmanager
    def gpu_work_paused(self, description: str) -> Iterator[None]:
        """Keep this process's GPU work from starting while the body runs (e.g. unloading a model): the GPU slot, or
        nothing while another process holds the GPU (then no GPU work of this process can be running). GpuBusyError
        while GPU work of this process holds it."""
        with ExitStack() as stack:
            try:
                stack.enter_context(self.gpu_slot(description))
            except GpuBusyError:
                holder = self.gpu_holder()
                if not holder or holder["pid"] == os.getpid():
                    raise
            yield

    # jobs
    def start(self, name: str, argv: list[str], *, cwd: str | os.PathLike, run_dir: str | os.PathLike,
              kind: str = "gpu", env: dict[str, str] | None = None, description: str | None = None,
              watches_stop_request: bool = False) -> Job:
        """Start `argv` (an argument list, never a shell line) as a job whose files live in `run_dir`.

        `description` names the job where others are told it holds the GPU (default: its name).
        `watches_stop_request`: the child stops by itself when the run's stop-request file appears (the trainer does).

        Raises GpuBusyError when `kind` is "gpu" and another job holds the GPU, JobError if this run is already
        running or the command cannot be started.
        """
        if kind not in ("gpu", "cpu"):
            raise ValueError(f"kind must be 'gpu' or 'cpu', not {kind!r}")
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        existing = self.attach(run_dir)
        if existing and existing.is_running():
            raise JobError(f"{existing.name} is already running in {run_dir}; stop it first.")
        lock_fd = self._try_lock() if kind == "gpu" else None
        if kind == "gpu" and lock_fd is None:
            raise GpuBusyError(self.busy_message())
        try:
            files = RunLayout(run_dir)
            files.job_exit_file.unlink(missing_ok=True)
            files.stop_request_file.unlink(missing_ok=True)
            log_path = files.job_log
            child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
            if kind == "gpu":
                child_env[GPU_LOCK_HELD_ENV] = str(self.lock_path.resolve())
            supervisor = [sys.executable, "-m", "engine.jobs", "--exit-file", str(files.job_exit_file), "--", *argv]
            with open(log_path, "ab") as log:
                log_offset = log.tell()
                try:
                    process = subprocess.Popen(
                        supervisor, cwd=cwd, env={**child_env, "PYTHONPATH": _engine_pythonpath(child_env)},
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                        pass_fds=(lock_fd,) if lock_fd is not None else ())
                except OSError as err:
                    raise JobError(f"Could not start {argv[0]!r} in {cwd}: {err}") from err
            start_ticks = process_start_ticks(process.pid)
            record = JobRecord(name=name, kind=kind, argv=list(argv), cwd=str(cwd), run_dir=str(run_dir),
                               log_offset=log_offset, pid=process.pid, start_ticks=start_ticks or 0,
                               started=time.time(), watches_stop_request=watches_stop_request)
            atomic_write_json(files.job_file, asdict(record))
            if kind == "gpu":
                atomic_write_json(self.holder_path, {"description": description or name, "pid": process.pid,
                                                     "start_ticks": record.start_ticks, "run_dir": str(run_dir)})
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # the supervisor holds its own copy of the lock until it exits
        threading.Thread(target=process.wait, name=f"reap {name}", daemon=True).start()  # no zombie left behind
        return Job(record)

    def attach(self, run_dir: str | os.PathLike) -> Job | None:
        """The job recorded in `run_dir` (running or ended), or None if no job ever ran there."""
        try:
            data = json.loads(RunLayout(Path(run_dir)).job_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        known = JobRecord.__dataclass_fields__
        return Job(JobRecord(**{k: v for k, v in data.items() if k in known}))

    def current(self) -> Job | None:
        """The job holding the GPU now, if any (after a restart too)."""
        holder = self.gpu_holder()
        if not holder or not holder.get("run_dir"):
            return None
        job = self.attach(holder["run_dir"])
        return job if job and job.is_running() else None

    def status(self, job: Job) -> JobStatus:
        return job.status()

    def active_jobs(self) -> list[ActiveJob]:
        """Every running job: the training run holding the GPU (progress from its last step or progress event) and
        the in-process tasks, oldest first."""
        jobs = []
        job = self.current()
        if job is not None:
            stopping = bool(job.record.stop_requested)
            fraction, message = _last_progress(job)
            jobs.append(ActiveJob(id=f"training:{job.run_dir}", kind="training", description=f"training run "
                                  f"{job.name!r}", owner="", state="stopping" if stopping else "running",
                                  fraction=fraction, message=message, started=job.record.started))
        jobs += [ActiveJob(id=t.id, kind=t.kind, description=t.description, owner=t.owner, state=t.state,
                           fraction=None if t.waiting_for else t.fraction, message=t.message, started=t.started)
                 for t in self.tasks.active()]
        return jobs

    def stop_active(self, job_id: str, grace_s: float = 600.0) -> str:
        """Ask a job listed by active_jobs() to stop; returns what happens, in words. A training run is stopped in a
        thread of its own (it finishes its step and saves, which can take minutes)."""
        if job_id.startswith("training:"):
            job = self.attach(job_id.removeprefix("training:"))
            if job is None or not job.is_running():
                return "That training run has already ended."
            threading.Thread(target=self.stop, args=(job, grace_s), name=f"stop {job.name}", daemon=True).start()
            return f"Stopping training run {job.name!r}: it finishes the current step and saves its state."
        task = self.tasks.stop(job_id)
        return f"Stopping {task.description}..." if task else "That job has already ended."

    def stop(self, job: Job, grace_s: float = 120.0) -> JobStatus:
        """Ask the job to stop, wait up to `grace_s` seconds, then kill its process group; return the final status.

        A child that watches the stop-request file is asked there (no signal reaches a multi-GPU launcher, which
        would kill its workers 30 s later, maybe mid-save); if it is still running after `grace_s`, SIGINT gets
        SIGNAL_GRACE_S more. Any other child gets SIGINT at once (the trainer also finishes its step and saves).
        """
        record = job.record
        if not job.is_running():
            return job.status()
        record.stop_requested = time.time()
        atomic_write_json(job.files.job_file, asdict(record))
        if record.watches_stop_request:
            atomic_write_json(job.files.stop_request_file, {"requested": record.stop_requested})
            if job.wait(grace_s) or not job.is_running():
                return job.status()
            grace_s = SIGNAL_GRACE_S
        _signal_group(record.pid, signal.SIGINT)
        if not job.wait(grace_s) and job.is_running():
            record.killed = True
            atomic_write_json(job.files.job_file, asdict(record))
            _signal_group(record.pid, signal.SIGKILL)
            job.wait(10.0)
        return job.status()  # no leftovers to kill: the supervisor outlives every process the job started


def _last_progress(job: Job) -> tuple[float | None, str]:
    """The fraction and words of a job's latest step, progress or phase event, read from the end of its log."""
    for line in reversed(job.log_tail(40)):
        try:
            event = parse_event(json.loads(line)) if line.startswith("{") else None
        except json.JSONDecodeError:
            continue
        if isinstance(event, StepEvent) and event.max_steps:
            return event.step / event.max_steps, f"epoch {event.epoch}, step {event.step} / {event.max_steps}"
        if isinstance(event, ProgressEvent):
            return event.fraction, event.message
        if isinstance(event, PhaseEvent):
            return None, f"phase {event.phase}"
    return None, "starting"


def _engine_pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH that lets `python -m engine.jobs` be found from any working directory."""
    repo = str(Path(__file__).resolve().parent.parent)
    existing = env.get("PYTHONPATH")
    return f"{repo}{os.pathsep}{existing}" if existing else repo


def training_argv(config_path: str | os.PathLike, *, resume: bool = False, num_gpus: int = 1) -> list[str]:
    """The command that trains a run: `python -m engine.training --config run.toml [--resume]`, under DeepSpeed's
    launcher when more than one GPU is used."""
    args = ["--config", str(config_path), *(["--resume"] if resume else [])]
    if num_gpus > 1:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
                "--module", "engine.training", *args]
    return [sys.executable, "-m", "engine.training", *args]


# --- the supervisor --------------------------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _become_subreaper() -> bool:
    """Have orphaned descendants (e.g. the workers of a launcher that died first) re-parented to this process."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_descendants() -> None:
    """Block until every descendant has exited (they are all our children or our children's descendants)."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def _supervise(argv: list[str] | None = None) -> int:
    """Run a job's command, record how it exited, and keep the inherited GPU lock open until then.

    The job ends when the command and everything it started have exited: a launcher (DeepSpeed, torchrun) that
    dies on the stop signal first must not end the job while its workers still save their state.
    """
    parser = argparse.ArgumentParser(prog="python -m engine.jobs", description="job supervisor (started by JobRunner)")
    parser.add_argument("--exit-file", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    # The stop signal goes to the whole group; the child decides what it means. A Python handler (not SIG_IGN)
    # is used so the child starts with default signal handling.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    _become_subreaper()
    try:
        child = subprocess.Popen(command)
    except OSError as err:
        print(f"error: could not start {command[0]!r}: {err}", flush=True)
        returncode = 127
    else:
        returncode = child.wait()
    _reap_descendants()
    atomic_write_json(args.exit_file, {"returncode": returncode, "ended": time.time()})
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    raise SystemExit(_supervise())
