"""Strength and epoch sweeps and the labelled side-by-side comparison video."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.core.ffmpeg import write_video
from engine.core.files import atomic_write_json
from engine.core.motion import MOTION_UNIT, MOTION_UNIT_SHORT
from engine.core.progress import ProgressFn, StopFn
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
               lora_files: Sequence[str | Path] | None = None) -> list[tuple[str, GenerationRequest]]:
    """(label, request) for each variant: the first LoRA at each strength and/or swapped for each epoch's file.

    Other stacked LoRAs keep their strengths. Strength 0 is the same video for every file, so it is rendered once.
    """
    if not request.loras and not lora_files:
        raise GenerationError("A sweep needs a LoRA: choose one (or several epochs) first.")
    first_path, first_strength = request.loras[0] if request.loras else (str(lora_files[0]), 1.0)
    rest = list(request.loras[1:])
    files = [str(f) for f in lora_files] if lora_files else [first_path]
    values = [float(s) for s in strengths] if strengths else [first_strength]
    variants, seen_zero = [], False
    for file in files:
        for strength in values:
            if strength == 0:
                if seen_zero:
                    continue
                seen_zero = True
                label = "strength 0 (base)"
            else:
                label = f"{lora_label(file)} @ {strength:g}" if len(files) > 1 else f"strength {strength:g}"
            variants.append((label, replace(request, loras=[(file, strength), *rest])))
    return variants


def lora_label(path: str | Path) -> str:
    """A short name: the epoch folder for a run's adapter_model.safetensors, else the file's stem."""
    path = Path(path)
    return path.parent.name if path.name == "adapter_model.safetensors" else path.stem


def render_sweep(pipe, request: GenerationRequest, out_dir: str | Path, *, strengths: Sequence[float] | None = None,
                 lora_files: Sequence[str | Path] | None = None, name: str | None = None, model: str | None = None,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> SweepResult:
    """Render every variant with the same seed, then one side-by-side comparison video of them all."""
    progress = on_progress or (lambda fraction, message: None)
    variants = plan_sweep(request, strengths, lora_files)
    if request.seed is None or request.seed < 0:
        request = replace(request, seed=secrets.randbelow(2**31))  # one seed for every variant
        variants = [(label, replace(r, seed=request.seed)) for label, r in variants]
    base = new_output_path(out_dir, name or "sweep")
    videos, labels, motion, clips = [], [], [], []
    for i, (label, variant) in enumerate(variants):
        def part(fraction: float, message: str, i=i, label=label) -> None:
            progress((i + fraction) / (len(variants) + 0.2), f"[{i + 1}/{len(variants)} {label}] {message}")

        generated = generate(pipe, variant, on_progress=part, should_stop=should_stop)
        path = base.with_name(f"{base.stem}-{i + 1:02d}-{_slug(label)}.mp4")
        write_outputs(pipe, generated, path, model=model, extra={"sweep": base.stem, "label": label})
        videos.append(path)
        labels.append(label)
        motion.append(read_sidecar(path)["motion"])
        clips.append(generated.frames)
    progress(len(variants) / (len(variants) + 0.2), "combining the comparison video")
    comparison = combine_side_by_side(clips, [f"{lab}  motion {m:.1f} {MOTION_UNIT_SHORT}"
                                              for lab, m in zip(labels, motion)],
                                      base, fps=request.fps)
    atomic_write_json(sidecar_path(comparison), {
        "studio_sweep": SIDECAR_VERSION, "video": comparison.name, "seed": variants[0][1].seed,
        "motion_unit": MOTION_UNIT,
        "variants": [{"label": lab, "video": v.name, "motion": m} for lab, v, m in zip(labels, videos, motion)],
    })
    progress(1.0, f"wrote {comparison.name}")
    return SweepResult(videos=videos, labels=labels, motion=motion, comparison=comparison)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")[:40]


def combine_side_by_side(clips: Sequence[np.ndarray], labels: Sequence[str], out_path: str | Path,
                         fps: float = 16.0, columns: int = 4) -> Path:
    """Tile equally sized clips in a grid (up to `columns` across), each under a label band; writes one mp4."""
    import cv2

    if not clips:
        raise ValueError("combine_side_by_side got no clips")
    frames, height, width = max(len(c) for c in clips), clips[0].shape[1], clips[0].shape[2]
    band = 24 if width >= 160 else 16
    cols = min(columns, len(clips))
    rows = math.ceil(len(clips) / cols)
    canvas = np.zeros((frames, rows * (height + band), cols * width, 3), dtype=np.uint8)
    for i, (clip, label) in enumerate(zip(clips, labels)):
        if clip.shape[1:3] != (height, width):
            clip = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in clip])
        y, x = (i // cols) * (height + band), (i % cols) * width
        title = np.zeros((band, width, 3), dtype=np.uint8)
        scale = min(0.5, max(0.25, width / 900))
        cv2.putText(title, label, (4, band - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        for t in range(frames):
            canvas[t, y:y + band, x:x + width] = title
            canvas[t, y + band:y + band + height, x:x + width] = clip[min(t, len(clip) - 1)]
    return write_video(canvas, out_path, fps=fps)
