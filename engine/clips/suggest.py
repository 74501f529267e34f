"""Suggested clips: the most dynamic windows (optical-flow motion) that do not cross a scene change."""

from __future__ import annotations

import heapq
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from engine.clips.cut import DEFAULT_FPS, DEFAULT_FRAMES, ClipError, Cut, ExportStopped, check_frames
from engine.core.files import atomic_write_json
from engine.core.layout import CacheLayout
from engine.core.motion import MOTION_RATE, MOTION_WIDTH, flow_speed, motion_size
from engine.core.progress import ProgressFn, StopFn
from engine.core.video import (
    FRAME_TIME_TOLERANCE,
    VideoError,
    VideoInfo,
    preview_proxy_path,
    probe_video,
    read_frames,
)


@dataclass
class Suggestion:
    start: float
    end: float
    score: float  # mean motion in the window, in engine.core.motion's MOTION_UNIT (% of frame width per second)
    scene: int  # index of the scene (between detected cuts) the window lies in


class Suggestions(list):
    """Suggested windows, best first (a list of Suggestion); `shortfall` says, for people, why there are fewer than
    asked ("" when there are as many)."""

    shortfall: str = ""


# ---------------------------------------------------------------- suggestions


def _greys(info: VideoInfo, proxy: Path | None, analysis_fps: float, width: int,
           height: int) -> Iterator[tuple[float, np.ndarray]]:
    """(time, grey frame) every 1 / analysis_fps seconds: the frame on screen then, read from the preview proxy
    when it has every source frame (frame i of the proxy is source frame i; a film's full-resolution decode is most
    of the analysis time, and the small proxy decodes many times faster), else from the source."""
    times = np.arange(0.0, info.duration, 1.0 / analysis_fps)
    wanted = [info.frame_index_at(float(t)) for t in times]
    reader = info
    if proxy is not None and probe_video(proxy).frame_count == info.frame_count:
        reader = probe_video(proxy)
    frames = read_frames(reader, wanted, size=(width, height), gray=True)
    try:
        yield from zip(times.tolist(), frames)
    finally:
        frames.close()  # closes the video now, also when the analysis stops early


def analyze_motion(source: str | os.PathLike | VideoInfo, *, analysis_fps: float = MOTION_RATE,
                   proxy: Path | None = None, on_progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """One pass over the video at `analysis_fps`: sample times, motion per sample (engine.core.motion's measure,
    % of frame width per second, from the previous sample; the first sample has none and reads 0) and scene-change
    times (a sharp jump in the grey-level histogram).

    `proxy`, the source's preview proxy, is read instead of the source when it has every source frame."""
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    width, height = motion_size(info.width, info.height)
    samples = _greys(info, proxy, analysis_fps, width, height)
    times, motion, hist_jump = [], [], []
    prev_grey, prev_hist = None, None
    expected = max(1, int(info.duration * analysis_fps))
    try:
        for t, grey in samples:
            if should_stop is not None and should_stop():
                raise ExportStopped("Suggestion analysis stopped.")
            hist = cv2.calcHist([grey], [0], None, [32], [0, 256]).ravel()
            hist /= hist.sum() or 1
            if prev_grey is None:
                motion.append(0.0)
                hist_jump.append(0.0)
            else:
                motion.append(flow_speed(prev_grey, grey, 1.0 / analysis_fps))
                hist_jump.append(0.5 * float(np.abs(hist - prev_hist).sum()))  # total variation distance, 0..1
            times.append(t)
            prev_grey, prev_hist = grey, hist
            if on_progress is not None and len(times) % 16 == 0:
                on_progress(min(0.99, len(times) / expected), f"analysing motion: {t:.1f} s")
    finally:
        samples.close()
    if not times:
        raise VideoError(f"Could not decode any frame of {info.path.name} for analysis.")
    jumps = np.asarray(hist_jump)
    grey_diff_cut = [i for i in range(1, len(jumps)) if jumps[i] > 0.35 and jumps[i] > 3 * np.median(
        jumps[max(1, i - 8): i + 9]) + 0.05]
    scene_changes = [float((times[i - 1] + times[i]) / 2) for i in grey_diff_cut]
    motion_arr = np.asarray(motion)
    for i in grey_diff_cut:  # the flow across a cut is not motion
        motion_arr[i] = motion_arr[i - 1] if i > 0 else 0.0
    return np.asarray(times), motion_arr, scene_changes


def _cached_analysis(info: VideoInfo, cache_dir: Path, analysis_fps: float, on_progress: ProgressFn | None,
                     should_stop: StopFn | None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """analyze_motion, kept in cache_dir/analysis per exact source file, and read from its preview proxy once one
    has been built: asking again (more windows, after new cuts) costs nothing."""
    proxy = preview_proxy_path(info, cache_dir)
    target = CacheLayout(cache_dir).analysis_dir / f"{proxy.stem}-{analysis_fps:g}fps-{MOTION_WIDTH}px.json"
    try:
        kept = json.loads(target.read_text(encoding="utf-8"))
        return np.asarray(kept["times"], float), np.asarray(kept["motion"], float), [float(t) for t in kept["scenes"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not analysed yet, or an unreadable file: analyse again
    times, motion, scenes = analyze_motion(info, analysis_fps=analysis_fps, proxy=proxy if proxy.exists() else None,
                                           on_progress=on_progress, should_stop=should_stop)
    atomic_write_json(target, {"source": str(info.path), "times": times.tolist(), "motion": motion.tolist(),
                               "scenes": scenes})
    return times, motion, scenes


def suggest_windows(source: str | os.PathLike, count: int = 5, *, frames: int = DEFAULT_FRAMES,
                    fps: float = DEFAULT_FPS, step: float = 0.5, avoid: Sequence[Cut] = (),
                    analysis_fps: float = MOTION_RATE, cache_dir: str | os.PathLike | None = None,
                    on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> Suggestions:
    """The `count` most dynamic clip windows (frames / fps seconds) that cross no scene change and overlap neither
    each other nor the cuts in `avoid`, best first, with their motion score: the mean motion between consecutive
    samples inside the window, the measure and unit of engine.core.motion (what the Generate tab shows of a video).

    With `cache_dir` (a project's cache folder) the motion analysis is kept there and read from the source's
    preview proxy when one has been built."""
    info = probe_video(source)
    check_frames(frames)
    span = frames / fps
    if info.duration + FRAME_TIME_TOLERANCE < span:
        raise ClipError(f"{info.path.name} lasts {info.duration:.3f} s, shorter than one clip "
                        f"({frames} frames at {fps:g} fps = {span:.3f} s).")
    if cache_dir is not None:
        times, motion, scene_changes = _cached_analysis(info, Path(cache_dir), analysis_fps, on_progress, should_stop)
    else:
        times, motion, scene_changes = analyze_motion(info, analysis_fps=analysis_fps, on_progress=on_progress,
                                                      should_stop=should_stop)
    bounds = [0.0, *scene_changes, info.duration]

    def window(start: float) -> Suggestion | None:
        """The window from `start` with its motion, if it lies inside one scene and holds two samples."""
        scene = int(np.searchsorted(bounds, start, side="right")) - 1
        if not 0 <= scene < len(bounds) - 1 or start + span > bounds[scene + 1] + FRAME_TIME_TOLERANCE:
            return None
        inside = (times >= start) & (times < start + span)
        pairs = inside[1:] & inside[:-1]  # flow from a sample before the window is not the window's motion
        if not pairs.any():
            return None
        return Suggestion(start, round(start + span, 4), round(float(motion[1:][pairs].mean()), 2), scene)

    def neighbours(start: float, end: float) -> list[Suggestion]:
        """Windows right after and right before a taken span: several dynamic windows then fit in one scene."""
        return [w for w in (window(round(end, 4)), window(round(start - span, 4))) if w is not None]

    taken = [(c.start, c.start + span) for c in avoid]
    candidates = [w for t in np.arange(0.0, info.duration, step) if (w := window(round(float(t), 3))) is not None]
    candidates += [w for a, b in taken for w in neighbours(a, b)]
    order = itertools.count()  # equal windows (a neighbour may repeat a grid window) never compare themselves
    heap = [(-w.score, w.start, next(order), w) for w in candidates]
    heapq.heapify(heap)
    chosen = Suggestions()
    while heap and len(chosen) < count:
        candidate = heapq.heappop(heap)[-1]
        if all(candidate.end <= a or candidate.start >= b for a, b in taken):
            chosen.append(candidate)
            taken.append((candidate.start, candidate.end))
            for w in neighbours(candidate.start, candidate.end):
                heapq.heappush(heap, (-w.score, w.start, next(order), w))
    chosen.sort(key=lambda w: (-w.score, w.start))
    if len(chosen) < count:
        scenes = len(bounds) - 1
        roomy = sum(hi - lo + FRAME_TIME_TOLERANCE >= span for lo, hi in zip(bounds, bounds[1:]))
        chosen.shortfall = (
            f"{len(chosen)} of the {count} windows asked for fit: a window ({frames} frames = {span:.2f} s) must lie "
            f"inside one scene, and {roomy} of the {scenes} scenes ({len(scene_changes)} scene changes found) last "
            f"that long; windows overlap neither each other nor the {len(avoid)} cuts already listed. Shorter clips "
            "(fewer frames) or fewer cuts leave room for more.")
    if on_progress is not None:
        on_progress(1.0, f"{len(chosen)} windows suggested, {len(scene_changes)} scene changes found")
    return chosen
