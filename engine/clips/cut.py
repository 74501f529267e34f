"""Frame-accurate cuts: clip settings, cut-list checks, clip names, export to 16 fps 4k+1 clips and the manifest."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from engine.core.ffmpeg import FFmpegError, write_video
from engine.core.files import append_jsonl, atomic_path, read_jsonl, remove_stale_temps
from engine.core.progress import ProgressFn, StopFn
from engine.core.video import FRAME_TIME_TOLERANCE, VideoError, VideoInfo, format_time, probe_video, read_frames

MANIFEST_NAME = "manifest.jsonl"


DEFAULT_FRAMES = 81  # 4k+1; 81 frames at 16 fps = 5.0625 s (a 5.0 s clip would give only 80)


DEFAULT_FPS = 16.0  # Wan's native frame rate






class ClipError(ValueError):
    """A cut or an export request cannot be done; the message says what and how to fix it."""


class ExportStopped(RuntimeError):
    """should_stop() asked to stop; clips finished before that are kept, the one in progress is discarded."""


@dataclass
class Cut:
    """One wanted clip: start time in seconds, optional end (exclusive), optional clip name (without .mp4)."""

    start: float
    end: float | None = None
    name: str = ""


@dataclass
class ExportedClip:
    path: Path
    start: float
    end: float
    frames: int
    width: int
    height: int
    skipped: bool  # True when an identical clip was exported before and kept as it was


# ---------------------------------------------------------------- settings


def check_frames(frames: int) -> int:
    if not isinstance(frames, (int, np.integer)) or frames < 1 or frames % 4 != 1:
        raise ClipError(f"frames must be 4k+1 (for example 17, 33, 49, 81), got {frames!r}: Wan's VAE packs "
                        "4 frames per latent after the first.")
    return int(frames)


def parse_size(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'832x480' -> (832, 480); None or '' -> None (keep the source size). Sides must be multiples of 16."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
        if not match:
            raise ClipError(f"Size {text!r} is not WIDTHxHEIGHT, for example 832x480.")
        size = int(match.group(1)), int(match.group(2))
    else:
        size = int(text[0]), int(text[1])
    if min(size) < 16 or size[0] % 16 or size[1] % 16:
        raise ClipError(f"Size {size[0]}x{size[1]}: width and height must be multiples of 16 (at least 16), "
                        "for example 832x480 or 480x832.")
    return size


def fitted_frames(duration: float, fps: float = DEFAULT_FPS) -> int:
    """The largest 4k+1 frame count whose clip (frames / fps seconds) fits in `duration` seconds; 0 if none."""
    whole = int(np.floor((duration + FRAME_TIME_TOLERANCE) * fps))
    return 0 if whole < 1 else whole - (whole - 1) % 4


def clip_frames(cut: Cut, frames: int | None, fps: float) -> int:
    """Frames the clip of `cut` gets: `frames` when fixed, else the longest 4k+1 that fits in start..end."""
    if frames is not None:
        return frames
    if cut.end is None:
        return DEFAULT_FRAMES
    return fitted_frames(cut.end - cut.start, fps)


# ---------------------------------------------------------------- cut lists


def validate_cuts(cuts: Sequence[Cut], duration: float, *, frames: int | None = DEFAULT_FRAMES,
                  fps: float = DEFAULT_FPS) -> list[list[str]]:
    """Problems of each cut (same order), as short texts: out of range, too short, overlapping another cut.

    A clip spans start .. start + frames / fps; it must lie inside the source, and a cut with an end must be at
    least that long (or, with frames=None, long enough for 5 frames).
    """
    spans, flags = [], []
    for cut in cuts:
        problems = []
        count = clip_frames(cut, frames, fps)
        span = count / fps
        if cut.end is not None and cut.end - cut.start + FRAME_TIME_TOLERANCE < max(count, 5) / fps:
            problems.append(f"too short: {cut.end - cut.start:.3f} s < {max(span, 5 / fps):.3f} s")
        if cut.start < 0 or cut.start >= duration:
            problems.append(f"out of range: starts outside 0..{duration:.3f} s")
        elif cut.start + span > duration + FRAME_TIME_TOLERANCE:
            problems.append(f"out of range: the clip would end at {cut.start + span:.3f} s, after the source "
                            f"({duration:.3f} s)")
        spans.append((cut.start, cut.start + span))
        flags.append(problems)
    for a, (a_start, a_end) in enumerate(spans):
        for b, (b_start, b_end) in enumerate(spans):
            if a != b and b_start < a_end - FRAME_TIME_TOLERANCE and a_start < b_end - FRAME_TIME_TOLERANCE:
                flags[a].append(f"overlaps cut {b + 1}")
    return flags


UNSAFE_NAME_CHARACTERS = re.compile(r"[\x00-\x1f\x7f/\\:*?\"'`<>|]")


def clip_name(source: str | os.PathLike, cut: Cut) -> str:
    """Deterministic clip file stem: the cut's name, or '<source stem>_<MMM>m<SS>s<mmm>' from its start."""
    if cut.name.strip():
        stem = cut.name.strip()
    else:
        millis = int(round(cut.start * 1000))
        stem = f"{Path(source).stem}_{millis // 60000:03d}m{millis // 1000 % 60:02d}s{millis % 1000:03d}"
    # any letter or punctuation of any script stays (an en dash, accents, CJK); path separators, quotes, control
    # characters and what Windows forbids in names do not
    stem = UNSAFE_NAME_CHARACTERS.sub("_", stem).strip(" .")
    if not stem:
        raise ClipError(f"Clip name {cut.name!r} has no usable characters; use letters, digits, '-', '_' or '.'.")
    return stem


# ---------------------------------------------------------------- frames of a clip


@dataclass(frozen=True)
class _Fit:
    """How shown source pictures become clip frames: scaled to `scaled` (width, height), then centre-cropped to
    `size` (width, height)."""

    scaled: tuple[int, int]
    size: tuple[int, int]

    def apply(self, picture: np.ndarray) -> np.ndarray:
        (scaled_w, scaled_h), (width, height) = self.scaled, self.size
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        return picture[top:top + height, left:left + width]


def _fit(info: VideoInfo, size: tuple[int, int] | None, crop: bool) -> _Fit:
    """How the source's display-size pictures (square pixels, upright) are brought to the export size."""
    if size is None:  # keep the display size; yuv420p needs even sides
        width, height = info.width - info.width % 2, info.height - info.height % 2
        if width < 2 or height < 2:
            raise ClipError(f"{info.path.name} is {info.width}x{info.height}: too small to export.")
        return _Fit((info.width, info.height), (width, height))
    width, height = size
    if not crop:
        return _Fit((width, height), (width, height))
    factor = max(width / info.width, height / info.height)  # cover the target, then cut the overflow evenly
    scaled_w = max(width, int(np.ceil(info.width * factor - 1e-6)))
    scaled_h = max(height, int(np.ceil(info.height * factor - 1e-6)))
    return _Fit((scaled_w, scaled_h), (width, height))


def _clip_frames(info: VideoInfo, start: float, count: int, fps: float, fit: _Fit, out_name: str,
                 should_stop: StopFn | None) -> Iterator[np.ndarray]:
    for picture in read_frames(info, info.indices_at(start, count, fps), size=fit.scaled):
        if should_stop is not None and should_stop():
            raise ExportStopped(f"Stopped before {out_name} was finished; it was not written.")
        yield fit.apply(picture)


# ---------------------------------------------------------------- export


def _manifest_latest(out_dir: Path) -> dict[str, dict]:
    """Latest manifest record per clip file name (re-exports append; the last line for a clip wins)."""
    return {record["clip"]: record for record in read_jsonl(out_dir / MANIFEST_NAME) if "clip" in record}


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """One record per clip that still exists in out_dir, sorted by clip name."""
    out_dir = Path(out_dir)
    latest = _manifest_latest(out_dir)
    return [latest[name] for name in sorted(latest) if (out_dir / name).exists()]


def cut_clip(info: VideoInfo, cut: Cut, out_path: str | os.PathLike, *, frames: int = DEFAULT_FRAMES,
             fps: float = DEFAULT_FPS, size: tuple[int, int] | None = None, crop: bool = True,
             should_stop: StopFn | None = None) -> tuple[int, int]:
    """Encode one clip (H.264, yuv420p, no audio) to out_path atomically; return its (width, height).

    Nothing is left at out_path (or beside it) when decoding fails or should_stop() turns true."""
    check_frames(frames)
    fit = _fit(info, size, crop)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".part.mp4") as tmp:
        try:
            write_video(_clip_frames(info, cut.start, frames, fps, fit, out_path.name, should_stop), tmp, fps=fps)
        except VideoError as exc:
            raise ClipError(f"Cutting {out_path.name} from {info.path.name} at {cut.start:.3f} s failed: "
                            f"{exc}") from None
        except FFmpegError as exc:
            raise ClipError(f"Encoding {out_path.name} failed: {exc}") from None
    return fit.size


def cut_clips(source: str | os.PathLike, cuts: Sequence[Cut], out_dir: str | os.PathLike, *,
              frames: int | None = DEFAULT_FRAMES, fps: float = DEFAULT_FPS,
              size: tuple[int, int] | str | None = None, crop: bool = True,
              on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> list[ExportedClip]:
    """Export `cuts` of `source` as Wan training clips into out_dir and record them in out_dir/manifest.jsonl.

    frames: clip length (4k+1) for every cut, or None for each cut's longest 4k+1 that fits in its start..end.
    size: (width, height) or 'WxH' in multiples of 16, or None to keep the source size; crop=True scales to cover
    and center-crops, crop=False stretches. A clip already exported with the same settings is kept, not redone.
    All cuts are checked before anything is written; ClipError names the bad ones.
    """
    info = probe_video(source)
    if frames is not None:
        check_frames(frames)
    size = parse_size(size)
    if not cuts:
        raise ClipError("The cut list is empty: add at least one cut.")
    shortest = clip_frames(cuts[0], frames, fps) if frames is not None else 5
    if info.duration + FRAME_TIME_TOLERANCE < shortest / fps:
        raise ClipError(f"{info.path.name} lasts {info.duration:.3f} s, shorter than one clip of {shortest} frames "
                        f"at {fps:g} fps ({shortest / fps:.3f} s). Use fewer frames or a longer source.")
    problems = [(i, p) for i, flags in enumerate(validate_cuts(cuts, info.duration, frames=frames, fps=fps))
                for p in flags if not p.startswith("overlaps")]
    if problems:
        listed = "; ".join(f"cut {i + 1} ({format_time(cuts[i].start)}): {p}" for i, p in problems[:5])
        raise ClipError(f"Cannot export from {info.path.name}: {listed}. Fix or delete those cuts.")
    names = [clip_name(info.path, cut) + ".mp4" for cut in cuts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ClipError(f"Two cuts would write the same clip file: {', '.join(duplicates)}. Give them other names "
                        "or starts.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # clips half-written by an export that was killed
    latest = _manifest_latest(out_dir)
    results = []
    for i, (cut, name) in enumerate(zip(cuts, names)):
        if should_stop is not None and should_stop():
            raise ExportStopped(f"Stopped after {i} of {len(cuts)} clips.")
        count = clip_frames(cut, frames, fps)
        if on_progress is not None:
            on_progress(i / len(cuts), f"clip {i + 1}/{len(cuts)}: {name}")
        width, height = _fit(info, size, crop).size
        record = {"clip": name, "source": str(info.path.resolve()), "start": round(cut.start, 6),
                  "end": round(cut.start + count / fps, 6), "frames": count, "fps": fps, "width": width,
                  "height": height, "crop": crop if size else None,
                  "first_source_frame": info.frame_index_at(cut.start), "source_frames": info.frame_count,
                  "source_size": f"{info.width}x{info.height}"}  # as shown: clips cut by older readers are redone
        previous = latest.get(name)
        same = previous is not None and {k: previous.get(k) for k in record} == record
        if not (same and (out_dir / name).exists()):
            cut_clip(info, cut, out_dir / name, frames=count, fps=fps, size=size, crop=crop, should_stop=should_stop)
            append_jsonl(out_dir / MANIFEST_NAME, {**record, "exported": datetime.now().isoformat(timespec="seconds")})
        results.append(ExportedClip(path=out_dir / name, start=cut.start, end=record["end"], frames=count,
                                    width=width, height=height, skipped=same and (out_dir / name).exists()))
    if on_progress is not None:
        on_progress(1.0, f"{len(cuts)} clips in {out_dir}")
    return results


def count_frames(path: str | os.PathLike) -> int:
    """Frames in a video file (a packet count, no decoding)."""
    return probe_video(path).frame_count
