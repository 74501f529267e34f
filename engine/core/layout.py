"""The project folder: one layout that every stage reads and writes, so the UI can always rebuild its state from disk.
This module is the one place that joins these names; every other module asks it for a path.

    <project>/
      project.json        name, chosen models, clip export defaults
      caption_style.toml  the Captions tab's pure-style rules (trigger, replacement table, banned words)
      captions.jsonl|csv  all captions exported from the Captions tab
      sources/            source videos (films, recordings) the clips are cut from (uploads land here)
      clips/              training clips: name.mp4 with its caption name.txt beside it (diffusion-pipe's convention),
                          manifest.jsonl (where each clip came from)
        .captions/        history/<clip>.jsonl (every save, for undo), suggestions.jsonl, originals/ (the bytes of
                          non-UTF-8 caption files before they were replaced)
      cache/              rebuilt on demand, except cuts/ (see CacheLayout)
      runs/<run>/         run.toml + dataset.toml, metrics.jsonl, state/ (resume), epochN/adapter_model.safetensors
      loras/              LoRA files uploaded in the Generate tab (any supported format), listed beside the runs' epochs
      outputs/            generated videos, each with a .json sidecar of its parameters
        inputs/           the start images of those videos, named by content, so a sidecar's image stays on disk

The studio home (`studio_home()`) holds demo/ (the demo project), models/ (the tiny model kits) and jobs/ (the records
of long tasks run in child processes). Paths with spaces, quotes or non-ASCII characters are fine everywhere: nothing
here goes through a shell.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from engine.core.files import atomic_write_json, copy_keeping_apart, read_text

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")
PROJECT_FILE = "project.json"
STYLE_RULES_FILE = "caption_style.toml"
CAPTION_META_DIRNAME = ".captions"  # inside a clips folder; hidden, so clips/ stays a valid diffusion-pipe dataset


def list_videos(folder: Path) -> list[Path]:
    """Video files in a folder, sorted; hidden names (such as in-progress atomic writes) are skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".") and p.is_file())


MAX_NAME_BYTES = 200  # file systems allow 255; an atomic write's temporary name adds up to ~30 (engine.core.files)


def checked_name(name: str, what: str) -> str:
    """`name` unchanged if it can be one file or folder name inside a project folder, else ValueError saying why.

    Every name that comes from a person or a browser (run, upload, clip, output names) passes here before it becomes a
    path, so none can point outside its folder. Spaces, quotes and non-ASCII characters are fine; a path separator,
    '.' or '..', a leading '.' (hidden and in-progress files), control characters or over MAX_NAME_BYTES are not.
    """
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif name.startswith("."):
        problem = "starts with '.' (hidden files, and '..' would leave the folder)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "holds a control character"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif name != name.strip():
        problem = "starts or ends with a space"
    if problem:
        raise ValueError(f"{what} {name!r} {problem}: use a plain name such as 'run 1' (letters, digits, spaces and "
                         "punctuation other than '/' and '\\').")
    return name


def studio_home() -> Path:
    """Where the demo project and tiny model kits live: $WAN_STUDIO_HOME, else `workspace/` in the repository."""
    env = os.environ.get("WAN_STUDIO_HOME")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "workspace"


def caption_file(clip: str | os.PathLike) -> Path:
    """The caption of a clip: name.txt beside name.mp4 (diffusion-pipe's convention)."""
    return Path(clip).with_suffix(".txt")


def cache_dir_for_run(run_dir: Path) -> Path:
    """The cache a run reads and fills: its project's cache/ (shared by all the project's runs) when the run folder is
    <project>/runs/<run>, else the run folder's own cache/."""
    run_dir = Path(run_dir).resolve()
    project = Project(run_dir.parent.parent)
    if run_dir.parent == project.runs_dir and project.settings_file.exists():
        return project.cache_dir
    return run_dir / "cache"


def demo_project_dir(home: Path) -> Path:
    return home / "demo"


def tiny_models_dir(home: Path) -> Path:
    return home / "models"


def jobs_dir(home: Path) -> Path:
    return home / "jobs"


@dataclass(frozen=True)
class CacheLayout:
    """A cache folder (a project's cache/, or a run's own when it trains outside a project). Everything in it is
    rebuilt from sources, clips and models when missing, except cuts/ (the Clips tab's cut list of each source)."""

    root: Path

    @property
    def latents_dir(self) -> Path:
        """VAE latents, first-frame conditions and CLIP image states, one safetensors per clip window and bucket."""
        return self.root / "latents"

    @property
    def text_dir(self) -> Path:
        """UMT5 caption embeddings, one safetensors per caption text and text encoder."""
        return self.root / "text"

    @property
    def analysis_dir(self) -> Path:
        """Motion analyses of source videos (json), so asking for more suggestions is instant."""
        return self.root / "analysis"

    @property
    def previews_dir(self) -> Path:
        """Preview proxies of sources and played selections (mp4)."""
        return self.root / "previews"

    @property
    def frames_dir(self) -> Path:
        """Stills taken from clips as start images in the Generate tab (png)."""
        return self.root / "generate-frames"

    @property
    def timestamps_dir(self) -> Path:
        """Timestamps files exported from the Clips tab."""
        return self.root / "timestamps"

    def cut_list_file(self, source_name: str) -> Path:
        """The Clips tab's cut list of one source (a timestamps file), saved on every change."""
        return self.root / "cuts" / f"{source_name}.txt"

    def deleted_cuts_file(self, source_name: str) -> Path:
        """The cut list "Delete all cuts" removed last from one source, which "Restore deleted cuts" brings back."""
        return self.root / "cuts" / f"{source_name}.deleted.txt"


@dataclass(frozen=True)
class CaptionMetaLayout:
    """clips/.captions/: the Captions stage's bookkeeping beside a clips folder (any clips folder, not only a
    project's: the captions command works on a bare folder)."""

    clips_dir: Path

    @property
    def root(self) -> Path:
        return self.clips_dir / CAPTION_META_DIRNAME

    @property
    def suggestions_file(self) -> Path:
        return self.root / "suggestions.jsonl"

    @property
    def originals_dir(self) -> Path:
        return self.root / "originals"

    def history_file(self, clip: str | os.PathLike) -> Path:
        return self.root / "history" / f"{Path(clip).stem}.jsonl"


@dataclass
class ProjectSettings:
    """Per-project defaults, stored in project.json."""

    name: str = "project"
    wan_model: str = ""  # folder or hub id; empty means the studio's current model
    captioner_model: str = ""
    video_captioner_model: str = ""  # Qwen2.5-VL folder or hub id; empty: the studio's current one
    caption_instruction: str = ""  # what the video captioner is asked; empty: its pure-style default
    caption_video_fps: float = 4.0  # frames per second the video captioner watches (81 frames at 16 fps -> 21)
    caption_with_video: bool = False  # the Captions tab suggests with the video captioner (else BLIP-2)
    clip_frames: int = 81  # frames per exported clip (4k+1); 81 = 5.0625 s at 16 fps
    clip_fps: float = 16.0  # Wan's native frame rate
    clip_width: int = 832  # export size, multiples of 16; 832x480 is Wan 480p landscape
    clip_height: int = 480
    draft_lora: str = ""  # an accelerator (step-distillation) LoRA file of the person's: Generate's Draft mode uses it
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))


class Project:
    """A project folder on disk. Folders are created on demand."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def open(cls, root: str | os.PathLike, create: bool = True, **settings) -> "Project":
        """Open a project folder, creating its layout (and project.json with `settings`) when `create` is set."""
        project = cls(root)
        if not project.root.exists() and not create:
            raise FileNotFoundError(f"Project folder not found: {project.root}")
        if project.root.exists() and not project.root.is_dir():
            raise NotADirectoryError(f"Project path is a file, not a folder: {project.root}")
        for folder in (project.root, project.sources_dir, project.clips_dir, project.cache_dir, project.runs_dir,
                       project.outputs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if not project.settings_file.exists():
            settings.setdefault("name", project.root.name)
            project.save_settings(ProjectSettings(**settings))
        return project

    # folders
    @property
    def settings_file(self) -> Path:
        return self.root / PROJECT_FILE

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    @property
    def clips_dir(self) -> Path:
        return self.root / "clips"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def output_inputs_dir(self) -> Path:
        """Start images of the generated videos, kept so each sidecar points at a file that stays."""
        return self.outputs_dir / "inputs"

    @property
    def loras_dir(self) -> Path:
        """LoRA files uploaded in the Generate tab (from other trainers, or other projects)."""
        return self.root / "loras"

    @property
    def cache(self) -> CacheLayout:
        return CacheLayout(self.cache_dir)

    @property
    def style_rules_file(self) -> Path:
        return self.root / STYLE_RULES_FILE

    def captions_export_file(self, suffix: str) -> Path:
        """Where the Captions tab exports every caption: captions.jsonl or captions.csv."""
        return self.root / f"captions{suffix}"

    @property
    def name(self) -> str:
        return self.settings().name

    @classmethod
    def of_clips_dir(cls, clips_dir: str | os.PathLike) -> "Project | None":
        """The project whose clips/ folder `clips_dir` is, or None for a folder outside any project."""
        project = cls(Path(clips_dir).expanduser().resolve().parent)
        return project if project.settings_file.is_file() and project.clips_dir == Path(clips_dir).resolve() else None

    # settings
    def settings(self) -> ProjectSettings:
        data = json.loads(read_text(self.settings_file))
        known = ProjectSettings.__dataclass_fields__
        return ProjectSettings(**{k: v for k, v in data.items() if k in known})

    def save_settings(self, settings: ProjectSettings) -> None:
        atomic_write_json(self.settings_file, asdict(settings))

    # contents
    def list_sources(self) -> list[Path]:
        return list_videos(self.sources_dir)

    def list_clips(self) -> list[Path]:
        return list_videos(self.clips_dir)

    def caption_path(self, clip: str | os.PathLike) -> Path:
        return caption_file(clip)

    def list_runs(self) -> list[Path]:
        return sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def run_dir(self, name: str) -> Path:
        """runs/<name>; ValueError when `name` is not a plain name (see checked_name)."""
        return self.runs_dir / checked_name(name, "Run name")

    def source_file(self, name: str) -> Path:
        """sources/<name>; ValueError when `name` is not a plain name."""
        return self.sources_dir / checked_name(name, "Source video name")

    def clip_file(self, name: str) -> Path:
        """clips/<name>; ValueError when `name` is not a plain name."""
        return self.clips_dir / checked_name(name, "Clip name")

    def add_upload(self, upload: str | os.PathLike, folder: Path) -> Path:
        """Copy an uploaded file into one of the project's folders under its own (checked) name, kept apart by
        content: the same bytes again reuse the earlier copy, different bytes under a taken name get "name (2).ext".
        Returns the file in the project; ValueError when the name cannot be a file name here."""
        upload = Path(upload)
        return copy_keeping_apart(upload, folder / checked_name(upload.name, "Uploaded file name"))

    def run(self, name: str) -> RunLayout:
        """The folder of run `name` (it may not exist yet); ValueError for a name that is not a plain folder name."""
        return RunLayout(self.run_dir(name))

    def new_run_name(self, prefix: str = "run") -> str:
        """A fresh, sortable run name such as run-20261125-235900 (suffixed if that exists already)."""
        base = f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
        name, n = base, 1
        while (self.runs_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name


# ================================================================================================ a run's folder
# (engine.training writes it, engine.jobs keeps its job files in it, the Train and Generate tabs read it back)

ADAPTER_FILE = "adapter_model.safetensors"  # a saved LoRA folder's weights (diffusion-pipe's and peft's name)
RUN_TOML, DATASET_TOML = "run.toml", "dataset.toml"  # also the names a run TOML refers to its dataset file by
_SAVED_LORA_FOLDER = re.compile(r"(epoch|step)(\d+)")


@dataclass(frozen=True)
class RunLayout:
    """A training run's folder, runs/<run>/ in a project (or any output_dir a run TOML names):

        run.toml, dataset.toml   the settings (diffusion-pipe's format; output_dir "." = this folder)
        metrics.jsonl            the trainer's events (engine.training.events), tb/ the same scalars for TensorBoard
        state/stepS/             resume states (the newest few); state.before-<time>/ after a fresh start
        epochN/, stepS/          saved LoRAs: adapter_model.safetensors + adapter_config.json
        samples/                 epochN.mp4 samples rendered while training, first_frame.png (their default still)
        sample start.<ext>       the still chosen in the Train tab for those samples
        job.json, job.log,       the job runner's record, the child's output, how it exited (engine.jobs)
        job-exit.json
        stop-request.json        written to ask the run to stop at its next step (every rank watches it)
    """

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    # settings and events
    @property
    def run_toml(self) -> Path:
        return self.root / RUN_TOML

    @property
    def dataset_toml(self) -> Path:
        return self.root / DATASET_TOML

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tb"

    # training state and outputs
    @property
    def state_root(self) -> Path:
        return self.root / "state"

    def state_aside(self, stamp: str) -> Path:
        """Where a fresh start moves the earlier run's resume states."""
        return self.root / f"state.before-{stamp}"

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"epoch{epoch}"

    def step_dir(self, step: int) -> Path:
        return self.root / f"step{step}"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    def sample_file(self, epoch: int) -> Path:
        return self.samples_dir / f"epoch{epoch}.mp4"

    @property
    def first_frame_file(self) -> Path:
        return self.samples_dir / "first_frame.png"

    def sample_start_image(self, suffix: str) -> Path:
        """The still chosen for the run's samples, kept with the run (`suffix`: the upload's, e.g. ".png")."""
        return self.root / f"sample start{suffix.lower()}"

    @property
    def cache_dir(self) -> Path:
        return cache_dir_for_run(self.root)

    # the job runner's files
    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def job_log(self) -> Path:
        return self.root / "job.log"

    @property
    def job_exit_file(self) -> Path:
        return self.root / "job-exit.json"

    @property
    def stop_request_file(self) -> Path:
        """Written to ask the run to stop: every rank sees it at its next step, so a run under a multi-GPU launcher
        (which kills its workers 30 s after a signal) can finish its step and save first."""
        return self.root / "stop-request.json"

    # reading back
    def loras(self) -> list[tuple[int, Path]]:
        """The LoRAs the run saved at the end of epochs, by epoch number: (epoch, epochN/adapter_model.safetensors),
        or for a Wan 2.2 run (epoch, epochN/), the folder holding its experts' files (engine.core.families)."""
        from engine.core.families import Wan22I2V

        pair_files = [Wan22I2V.lora_file_name(expert) for expert in Wan22I2V.experts]
        found = []
        for folder in self.root.glob("epoch*"):
            match = _SAVED_LORA_FOLDER.fullmatch(folder.name)
            if not match or match[1] != "epoch":
                continue
            if (folder / ADAPTER_FILE).is_file():
                found.append((int(match[2]), folder / ADAPTER_FILE))
            elif any((folder / name).is_file() for name in pair_files):
                found.append((int(match[2]), folder))
        return sorted(found)


def saved_lora_of(path: str | os.PathLike) -> tuple[RunLayout, str, int] | None:
    """(run, "epoch" or "step", N) for a LoRA a run saved (<run>/epochN/ or <run>/stepS/adapter_model.safetensors);
    None for any other file."""
    path = Path(path)
    match = _SAVED_LORA_FOLDER.fullmatch(path.parent.name)
    if path.name != ADAPTER_FILE or not match:
        return None
    return RunLayout(path.parent.parent), match[1], int(match[2])
