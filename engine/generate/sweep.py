"""Strength and epoch sweeps and the labelled side-by-side comparison video."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from engine.core.files import atomic_path, atomic_write_json
from engine.core.layout import ADAPTER_FILE
from engine.core.motion import MOTION_UNIT, MOTION_UNIT_SHORT
from engine.core.progress import ProgressFn, StopFn
from engine.generate.draft import DraftSettings, draft_of, draft_record
from engine.generate.render import SIDECAR_VERSION, generate, new_output_path, read_sidecar, sidecar_path, write_outputs
from engine.generate.request import GenerationError, GenerationRequest

DEFAULT_SWEEP_STRENGTHS = (0.0, 0.5, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------- sweeps

@dataclass
class SweepResult:
    videos: list[Path]
    labels: list[str]
    motion: list[float]  # each variant's motion, in engine.core.motion's MOTION_UNIT
    comparison: Path  # all variants side by side with labels, one mp4 (+ .json listing them)


def plan_sweep(request: GenerationRequest, strengths: Sequence[float] | None = None,
               lora_files: Sequence[str | Path] | None = None, swept: int = 0) -> list[tuple[str, GenerationRequest]]:
    """(label, request) for each variant: LoRA entry `swept` (the first by default; for a Wan 2.2 pair, 1 sweeps the
    low-noise one) at each strength and/or swapped for each epoch's file, keeping its expert.

    Other stacked LoRAs keep their strengths. Strength 0 of the swept LoRA is the same video for every file, so it
    is rendered once.
    """
    if not request.loras and not lora_files:
        raise GenerationError("A sweep needs a LoRA: choose one (or several epochs) first.")
    if request.loras and not 0 <= swept < len(request.loras):
        raise GenerationError(f"swept LoRA {swept + 1} does not exist: the request has {len(request.loras)}.")
    path, strength, *expert = request.loras[swept] if request.loras else (str(lora_files[0]), 1.0)
    before, after = list(request.loras[:swept]), list(request.loras[swept + 1:])
    files = [str(f) for f in lora_files] if lora_files else [path]
    values = [float(s) for s in strengths] if strengths else [strength]
    named = bool(expert)  # a Wan 2.2 expert's LoRA: at 0 the other expert's LoRA still acts, so it is no base video
    variants, seen_zero = [], False
    for file in files:
        for value in values:
            if value == 0:
                if seen_zero:
                    continue
                seen_zero = True
                label = f"{lora_label(file)} @ 0" if named else "strength 0 (base)"
            else:
                label = f"{lora_label(file)} @ {value:g}" if len(files) > 1 or named else f"strength {value:g}"
            variants.append((label, replace(request, loras=[*before, (file, value, *expert), *after])))
    return variants


def lora_label(path: str | Path) -> str:
    """A short name: the epoch folder for a run's adapter_model.safetensors (with the expert for a Wan 2.2 pair's
    file: epoch3 high_noise), else the file's stem."""
    path = Path(path)
    if path.name == ADAPTER_FILE:
        return path.parent.name
    if path.stem.endswith("_noise_model") and path.parent.name.startswith("epoch"):
        return f"{path.parent.name} {path.stem.removesuffix('_model')}"
    return path.stem


def render_sweep(pipe, request: GenerationRequest, out_dir: str | Path, *, strengths: Sequence[float] | None = None,
                 lora_files: Sequence[str | Path] | None = None, name: str | None = None, model: str | None = None,
                 swept: int = 0, draft: DraftSettings | None = None, on_progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> SweepResult:
    """Render every variant (see plan_sweep) with the same seed, then one side-by-side comparison video of them all.
    With `draft`, every variant is a draft (see engine.generate.draft) whose sidecar says how to render it in full."""
    progress = on_progress or (lambda fraction, message: None)
    variants = plan_sweep(request, strengths, lora_files, swept)
    if request.seed is None or request.seed < 0:
        request = replace(request, seed=secrets.randbelow(2**31))  # one seed for every variant
        variants = [(label, replace(r, seed=request.seed)) for label, r in variants]
    base = new_output_path(out_dir, name or "sweep")
    videos, labels, motion, clips = [], [], [], []
    for i, (label, variant) in enumerate(variants):
        def part(fraction: float, message: str, i=i, label=label) -> None:
            progress((i + fraction) / (len(variants) + 0.2), f"[{i + 1}/{len(variants)} {label}] {message}")

        extra = {"sweep": base.stem, "label": label}
        if draft:
            variant, extra["draft"] = draft_of(variant, draft), draft_record(variant, draft)
        generated = generate(pipe, variant, on_progress=part, should_stop=should_stop)
        path = base.with_name(f"{base.stem}-{i + 1:02d}-{_slug(label)}.mp4")
        write_outputs(pipe, generated, path, model=model, extra=extra)
        videos.append(path)
        labels.append(label)
        motion.append(read_sidecar(path)["motion"])
        clips.append(generated.frames)
    progress(len(variants) / (len(variants) + 0.2), "combining the comparison video")
    comparison = combine_side_by_side(clips, [f"{lab}  motion {m:.1f} {MOTION_UNIT_SHORT}"
                                              for lab, m in zip(labels, motion)],
                                      base, fps=request.fps)
    atomic_write_json(sidecar_path(comparison), {
        "studio_sweep": SIDECAR_VERSION, "video": comparison.name, "seed": variants[0][1].seed, "draft": bool(draft),
        "motion_unit": MOTION_UNIT,
        "variants": [{"label": lab, "video": v.name, "motion": m} for lab, v, m in zip(labels, videos, motion)],
    })
    progress(1.0, f"wrote {comparison.name}")
    return SweepResult(videos=videos, labels=labels, motion=motion, comparison=comparison)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")[:40]


def combine_side_by_side(clips: Sequence[np.ndarray], labels: Sequence[str], out_path: str | Path,
                         fps: float = 16.0, columns: int = 4) -> Path:
    """Tile clips (RGB uint8 [F, H, W, 3], resized to the first one's size) in a grid up to `columns` across, each
    under its label, into one H.264 mp4 written atomically; a shorter clip holds its last frame. Composed with moviepy
    (labels are Pillow text: antialiased, shrunk to fit a tile); raises ValueError for no clips or a label count that
    differs from the clip count."""
    from moviepy import ColorClip, ImageSequenceClip, clips_array

    if not clips or len(clips) != len(labels):
        raise ValueError(f"combine_side_by_side needs one label per clip, got {len(clips)} clips and {len(labels)} "
                         "labels")
    frames, height, width = max(len(c) for c in clips), clips[0].shape[1], clips[0].shape[2]
    band = 24 if width >= 160 else 16  # label height in pixels
    tiles = []
    for clip, label in zip(clips, labels):
        if clip.shape[1:3] != (height, width):
            clip = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in clip])
        held = list(clip) + [clip[-1]] * (frames - len(clip))
        video = ImageSequenceClip(held, fps=fps)
        tiles.append(clips_array([[_label_clip(label, width, band, video.duration)], [video]]))
    cols = min(columns, len(tiles))
    tiles += [ColorClip(tiles[0].size, color=(0, 0, 0), duration=tiles[0].duration)] * (-len(tiles) % cols)
    grid = clips_array([tiles[i:i + cols] for i in range(0, len(tiles), cols)])
    with atomic_path(Path(out_path), suffix=".tmp.mp4") as tmp:
        grid.write_videofile(str(tmp), fps=fps, codec="libx264", preset="veryfast", audio=False, logger=None,
                             ffmpeg_params=["-crf", "18", "-movflags", "+faststart"])
    grid.close()
    return Path(out_path)


def _label_clip(text: str, width: int, band: int, duration: float):
    """White text on a black band `width` x `band` pixels: one font size for every tile, smaller only where a long
    label would not fit."""
    from moviepy import TextClip
    from PIL import ImageFont

    margin = (4, 2)
    room = (width - 2 * margin[0], band - 2 * margin[1])
    size = max(6, band - 10)
    fits = ImageFont.load_default(size).getlength(text) <= room[0]
    return TextClip(text=text, size=room, margin=margin, font_size=size if fits else None, color="white",
                    bg_color="black", transparent=False, method="label", text_align="left",
                    horizontal_align="left").with_duration(duration)
