"""The demo project: a generated source video with real motion and scene changes, and tiny models, so every tab
works on a fresh CPU-only machine."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from engine.clips.cut import Cut, cut_clips
from engine.core.ffmpeg import write_video
from engine.core.files import atomic_write_text
from engine.core.layout import Project, demo_project_dir, studio_home, tiny_models_dir
from engine.core.models import ModelChoice, ensure_tiny_kits

DEMO_SOURCE_NAME = "demo source.mp4"  # a space on purpose: paths with spaces must work everywhere
DEMO_SCENE_SECONDS = (8.0, 7.0, 9.0, 6.0)  # four scenes, 30 s in all
DEMO_FPS = 24.0
DEMO_SIZE = (640, 360)
# Pre-cut demo clips (start second, name, hand-written "pure style" caption), so Captions/Train/Generate have material.
DEMO_CLIPS = (
    (1.0, "ball bounce 1", "yellow ball, bouncing fast across the frame, purple gradient background, static camera"),
    (4.5, "ball bounce 2", "yellow ball, leaping high and falling, purple gradient background, static camera"),
    (9.0, "stripes pan", "green diagonal stripes, slow sideways pan, pattern background"),
    (16.0, "square spin 1", "red square, spinning fast, white sparks orbiting, dark background, static camera"),
    (20.0, "square spin 2", "red square, spinning, sparks flying around it, dark background, static camera"),
)


def _scene_frame(scene: int, t: float, width: int, height: int, rng_seed: int) -> np.ndarray:
    """One frame of a scene at time t (seconds into the scene). Each scene has its own look and motion energy."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if scene == 0:  # fast bouncing ball over a vertical gradient: high motion
        frame = np.stack([40 + 80 * yy / height, 30 + 0 * xx, 90 + 100 * xx / width], -1)
        x = int(abs(((t * 420) % (2 * (width - 60))) - (width - 60))) + 30
        y = int(height - 30 - abs(np.sin(t * 3.1)) * (height - 80))
        frame = frame.astype(np.uint8).copy()
        cv2.circle(frame, (x, y), 28, (250, 210, 40), -1)
    elif scene == 1:  # slow pan over diagonal stripes: low motion
        stripes = ((xx + yy * 0.5 + t * 25) // 40) % 2
        frame = np.stack([60 + 120 * stripes, 120 + 60 * stripes, 60 + 0 * stripes], -1).astype(np.uint8)
    elif scene == 2:  # spinning square and orbiting particles: high motion
        frame = np.full((height, width, 3), (20, 20, 35), np.uint8)
        center = (width / 2, height / 2)
        box = cv2.boxPoints((center, (140, 140), t * 240.0)).astype(np.int32)
        cv2.fillPoly(frame, [box], (220, 60, 60))
        rng = np.random.default_rng(rng_seed)
        radii, phases, speeds = rng.uniform(60, 170, 24), rng.uniform(0, 6.3, 24), rng.uniform(1.5, 4.0, 24)
        for r, p, s in zip(radii, phases, speeds):
            pos = (int(center[0] + r * np.cos(p + s * t)), int(center[1] + r * 0.8 * np.sin(p + s * t)))
            cv2.circle(frame, pos, 6, (240, 240, 240), -1)
    else:  # almost still: a slowly breathing colour field
        level = 120 + 40 * np.sin(t * 0.8)
        frame = np.stack([level + 0 * xx, 90 + 30 * yy / height, 140 - 0 * xx], -1).astype(np.uint8)
    return frame


def demo_frames(fps: float = DEMO_FPS, size: tuple[int, int] = DEMO_SIZE) -> Iterator[np.ndarray]:
    """All frames of the demo source video, each stamped with its frame index (handy for checking cuts by eye)."""
    width, height = size
    index = 0
    for scene, seconds in enumerate(DEMO_SCENE_SECONDS):
        for i in range(int(round(seconds * fps))):
            frame = _scene_frame(scene, i / fps, width, height, rng_seed=scene)
            cv2.putText(frame, f"scene {scene + 1}  frame {index}", (12, height - 14), cv2.FONT_HERSHEY_SIMPLEX,
                        0.6, (255, 255, 255), 1, cv2.LINE_AA)
            index += 1
            yield frame


def write_demo_video(path: str | Path, fps: float = DEMO_FPS, size: tuple[int, int] = DEMO_SIZE) -> Path:
    return write_video(demo_frames(fps, size), path, fps=fps)


def ensure_demo_project(home: str | Path | None = None) -> tuple[Project, ModelChoice]:
    """Create (once) the demo project and the tiny model kits under the studio home; return both."""
    home = Path(home) if home else studio_home()
    models = ensure_tiny_kits(tiny_models_dir(home))
    project = Project.open(
        demo_project_dir(home), name="Demo project", wan_model=models.wan, captioner_model=models.captioner,
        clip_frames=17, clip_width=224, clip_height=128,  # small clips so the tiny model trains in seconds on a CPU
    )
    source = project.sources_dir / DEMO_SOURCE_NAME
    if not source.exists():
        write_demo_video(source)
    if not project.list_clips():
        settings = project.settings()
        exported = cut_clips(source, [Cut(start, name=name) for start, name, _ in DEMO_CLIPS], project.clips_dir,
                             frames=settings.clip_frames, fps=settings.clip_fps,
                             size=(settings.clip_width, settings.clip_height))
        for clip, (_, _, caption) in zip(exported, DEMO_CLIPS):
            atomic_write_text(project.caption_path(clip.path), caption + "\n")
    return project, models
