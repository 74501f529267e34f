"""The project folder: one layout that every stage reads and writes, so the UI can always rebuild its state from disk.

    <project>/
      project.json        name, chosen models, clip export defaults
      sources/            source videos (films, recordings) the clips are cut from
      clips/              training clips: name.mp4 with its caption name.txt beside it (diffusion-pipe's convention)
      cache/              VAE latents, text and image embeddings (safetensors), keyed by content and settings
      runs/<run>/         run.toml + dataset.toml, metrics.jsonl, state/ (resume), epochN/adapter_model.safetensors
      outputs/            generated videos, each with a .json sidecar of its parameters

Paths with spaces, quotes or non-ASCII characters are fine everywhere: nothing here goes through a shell.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from engine.core.files import atomic_write_json, read_text

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi")
PROJECT_FILE = "project.json"
# Written into runs/<run>/ to ask a training run to stop: every rank sees it at its next step, so a run under a
# multi-GPU launcher (which kills its workers 30 s after a signal) can finish its step and save first.
STOP_REQUEST_FILE = "stop-request.json"


def list_videos(folder: Path) -> list[Path]:
    """Video files in a folder, sorted; hidden names (such as in-progress atomic writes) are skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def studio_home() -> Path:
    """Where the demo project and tiny model kits live: $WAN_STUDIO_HOME, else `workspace/` in the repository."""
    env = os.environ.get("WAN_STUDIO_HOME")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "workspace"


@dataclass
class ProjectSettings:
    """Per-project defaults, stored in project.json."""

    name: str = "project"
    wan_model: str = ""  # folder or hub id; empty means the studio's current model
    captioner_model: str = ""
    clip_frames: int = 81  # frames per exported clip (4k+1); 81 = 5.0625 s at 16 fps
    clip_fps: float = 16.0  # Wan's native frame rate
    clip_width: int = 832  # export size, multiples of 16; 832x480 is Wan 480p landscape
    clip_height: int = 480
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
    def name(self) -> str:
        return self.settings().name

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
        return Path(clip).with_suffix(".txt")

    def list_runs(self) -> list[Path]:
        return sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def run_dir(self, name: str) -> Path:
        if not re.fullmatch(r"[\w.\- ]+", name) or name in (".", ".."):
            raise ValueError(f"Run name {name!r} may hold only letters, digits, spaces, '.', '_' and '-'.")
        return self.runs_dir / name

    def new_run_name(self, prefix: str = "run") -> str:
        """A fresh, sortable run name such as run-20261125-235900 (suffixed if that exists already)."""
        base = f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
        name, n = base, 1
        while (self.runs_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name
