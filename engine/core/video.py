"""Reading source videos: probing (an ffprobe stand-in, since imageio-ffmpeg ships only ffmpeg), the exact timestamp
of every frame, fast frame-at-time previews and thumbnails.

Time convention used everywhere in the studio: t = 0 is the first displayed frame, and "the frame at time t" is the
last frame whose timestamp is <= t + FRAME_TIME_TOLERANCE (the frame on screen at t). The tolerance absorbs times
typed with millisecond precision (frame 40 of a 30 fps video starts at 1.3333 s; "1.333" still means frame 40).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import subprocess
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from engine.core.ffmpeg import ffmpeg_exe
from engine.core.files import atomic_path
from engine.core.layout import CacheLayout

FRAME_TIME_TOLERANCE = 0.001  # seconds; far below one frame (16.7 ms at 60 fps)


class VideoError(ValueError):
    """A source video cannot be used; the message says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """What the studio needs to know about a source video. Sizes are as displayed (rotation applied)."""

    path: Path
    duration: float  # seconds, first displayed frame to the end of the last one
    fps: float  # average frame rate (frames / duration); the nominal rate for constant-rate sources
    width: int
    height: int
    codec: str
    pix_fmt: str
    bit_depth: int
    rotation: int  # degrees of the display matrix (0, 90, 180, 270); frames are returned already rotated
    frame_count: int
    variable_frame_rate: bool
    has_audio: bool
    start_time: float  # container start offset, subtracted from decoder timestamps
    frame_times: tuple[float, ...] = field(repr=False)  # presentation time of every frame, ascending, from 0

    def frame_index_at(self, t: float) -> int:
        """Index of the frame on screen at time t (clamped to the first and last frame)."""
        index = bisect.bisect_right(self.frame_times, t + FRAME_TIME_TOLERANCE) - 1
        return min(max(index, 0), self.frame_count - 1)

    def summary(self) -> dict[str, object]:
        """The probe facts a person wants to see, as plain values."""
        return {
            "file": self.path.name, "duration_s": round(self.duration, 3), "fps": round(self.fps, 3),
            "frame_rate": "variable" if self.variable_frame_rate else "constant",
            "resolution": f"{self.width}x{self.height}", "codec": self.codec, "pixel_format": self.pix_fmt,
            "bit_depth": self.bit_depth, "rotation": self.rotation, "frames": self.frame_count,
            "audio": self.has_audio,
        }


def _split_top_level(text: str) -> list[str]:
    """Split an ffmpeg stream description on commas that are not inside parentheses or brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return parts


def _header(path: Path) -> str:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True)
    return proc.stderr.decode("utf-8", "replace")


def _packet_times(path: Path) -> tuple[list[float], float]:
    """Presentation times (s) of every video packet, sorted, and the last packet's duration, without decoding."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
                           "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"], capture_output=True)
    time_base = Fraction(1, 1)
    stamps: list[tuple[int, int]] = []
    for line in proc.stdout.decode("ascii", "replace").splitlines():
        if line.startswith("#tb 0:"):
            time_base = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 4 and fields[0] == "0":
                stamps.append((int(fields[2]), int(fields[3])))
    stamps.sort()
    times = [float(pts * time_base) for pts, _ in stamps]
    last_duration = float(stamps[-1][1] * time_base) if stamps else 0.0
    return times, last_duration


_PROBE_CACHE: OrderedDict[tuple, VideoInfo] = OrderedDict()
_PROBE_LOCK = threading.Lock()


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Probe a video file: container facts from ffmpeg's header dump and exact frame timestamps from a packet scan.

    Raises VideoError for a missing file, a file that is not a video, audio only, or a video without frames.
    Results are cached per (path, size, mtime), so calling it again is free.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"Video file not found: {path}. Check the path (or upload the file again).")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _PROBE_LOCK:
        if key in _PROBE_CACHE:
            _PROBE_CACHE.move_to_end(key)
            return _PROBE_CACHE[key]
    if stat.st_size == 0:
        raise VideoError(f"{path.name} is empty (0 bytes). Copy or download the video again.")
    info = _probe_uncached(path)
    with _PROBE_LOCK:
        _PROBE_CACHE[key] = info
        while len(_PROBE_CACHE) > 32:
            _PROBE_CACHE.popitem(last=False)
    return info


def _probe_uncached(path: Path) -> VideoInfo:
    header = _header(path)
    if re.search(r"Invalid data found|moov atom not found|could not find codec|End of file", header) and \
            "Stream #" not in header:
        raise VideoError(f"{path.name} is not a readable video (ffmpeg: {_last_error_line(header)}). "
                         "It may be truncated or not a video at all; use an mp4, mkv, mov, webm or avi file.")
    video_lines = [line for line in header.splitlines()
                   if re.search(r"Stream #\d+:\d+.*: Video: ", line) and "attached pic" not in line]
    if not video_lines:
        if re.search(r"Stream #\d+:\d+.*: Audio: ", header):
            raise VideoError(f"{path.name} holds only audio, no video stream. Pick a video file.")
        raise VideoError(f"{path.name} is not a video (ffmpeg: {_last_error_line(header)}). "
                         "Use an mp4, mkv, mov, webm or avi file.")
    parts = _split_top_level(video_lines[0].split(": Video: ", 1)[1])
    codec = parts[0].split()[0]
    pix_fmt = parts[1].split("(")[0].strip() if len(parts) > 1 else "unknown"
    depth_match = re.search(r"p(\d{2})(?:le|be)$", pix_fmt)
    bit_depth = int(depth_match.group(1)) if depth_match else 8
    size_match = re.search(r"\b(\d{1,5})x(\d{1,5})\b", video_lines[0].split(": Video: ", 1)[1])
    if not size_match:
        raise VideoError(f"{path.name}: ffmpeg reports no picture size for its video stream; the file is damaged.")
    width, height = int(size_match.group(1)), int(size_match.group(2))
    rotation_match = re.search(r"rotation of (-?[\d.]+) degrees", header)
    rotation = int(round(float(rotation_match.group(1)))) % 360 if rotation_match else 0
    if rotation in (90, 270):
        width, height = height, width
    start_match = re.search(r"start: (-?[\d.]+)", header)
    start_time = float(start_match.group(1)) if start_match else 0.0
    nominal_fps_match = re.search(r"([\d.]+)(k?) fps", video_lines[0])

    times, last_duration = _packet_times(path)
    if not times:
        raise VideoError(f"{path.name} has a video stream but no frames (zero length or truncated). "
                         "Copy or download the video again.")
    origin = times[0]
    frame_times = tuple(t - origin for t in times)
    intervals = np.diff(np.asarray(frame_times))
    if len(intervals):
        typical = float(np.median(intervals))
        uneven = np.abs(intervals - typical) > max(0.001, 0.1 * typical)
        variable = bool(uneven.mean() > 0.01)
    else:
        typical, variable = 0.0, False
    if last_duration <= 0:
        last_duration = typical if typical > 0 else 1 / 25
    duration = frame_times[-1] + last_duration
    if variable or not nominal_fps_match:
        fps = len(frame_times) / duration
    else:
        fps = float(nominal_fps_match.group(1)) * (1000 if nominal_fps_match.group(2) else 1)
        fps = 1 / typical if typical > 0 and abs(1 / typical - fps) < 0.01 * fps else fps  # 29.97 -> 30000/1001
    return VideoInfo(
        path=path, duration=duration, fps=fps, width=width, height=height, codec=codec, pix_fmt=pix_fmt,
        bit_depth=bit_depth, rotation=rotation, frame_count=len(frame_times), variable_frame_rate=variable,
        has_audio=bool(re.search(r"Stream #\d+:\d+.*: Audio: ", header)), start_time=start_time + origin,
        frame_times=frame_times,
    )


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else "no output"


def _resize_to_width(frame: np.ndarray, max_width: int | None) -> np.ndarray:
    if not max_width or frame.shape[1] <= max_width:
        return frame
    height = max(2, round(frame.shape[0] * max_width / frame.shape[1]))
    return cv2.resize(frame, (max_width, height), interpolation=cv2.INTER_AREA)


class _FrameReader:
    """One open cv2 capture per file: decoding forward from the current position is much cheaper than a seek,
    which is what scrubbing and one-frame steps do."""

    FORWARD_LIMIT = 48  # frames; beyond this a keyframe seek is cheaper than decoding forward

    def __init__(self, path: Path):
        self.path = path
        self.capture = cv2.VideoCapture(str(path))
        self.next_index = 0
        self.lock = threading.Lock()

    def read(self, index: int) -> np.ndarray | None:
        with self.lock:
            if not self.capture.isOpened():
                return None
            ahead = index - self.next_index
            if ahead < 0 or ahead > self.FORWARD_LIMIT:
                self.capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            else:
                for _ in range(ahead):
                    self.capture.grab()
            ok, frame = self.capture.read()
            if not ok:
                self.next_index = -(10**9)  # force a seek next time
                return None
            self.next_index = index + 1
            return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


_READERS: OrderedDict[tuple, _FrameReader] = OrderedDict()
_FRAMES: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHE_LOCK = threading.Lock()
FRAME_CACHE_SIZE = 64  # previews (at most max_width wide), so a few tens of MB


def _reader(path: Path) -> _FrameReader:
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            reader = _READERS[key] = _FrameReader(path)
        _READERS.move_to_end(key)
        while len(_READERS) > 4:
            _READERS.popitem(last=False)[1].capture.release()
        return reader


def read_frame(info: VideoInfo, index: int, proxy: Path | None = None) -> np.ndarray:
    """RGB frame number `index` (0-based, display order, rotation applied), exactly the frame a cut would use.

    With a finished preview proxy (build_preview_proxy) the frame comes from it, small and quick. Otherwise
    constant-rate sources go through OpenCV (kept open, decoding forward when possible); variable-rate sources, and
    any that OpenCV cannot read, through an ffmpeg seek to the frame's exact timestamp.
    """
    if not 0 <= index < info.frame_count:
        raise VideoError(f"{info.path.name} has frames 0..{info.frame_count - 1}; frame {index} does not exist.")
    frame = None
    if proxy is not None and proxy.exists():
        frame = _reader(proxy).read(index)
    if frame is None and not info.variable_frame_rate:
        frame = _reader(info.path).read(index)
    if frame is None:
        frame = _ffmpeg_frame(info, index)
    return frame


def _ffmpeg_frame(info: VideoInfo, index: int) -> np.ndarray:
    seek = info.start_time + info.frame_times[index] - FRAME_TIME_TOLERANCE / 2
    width, height = info.width, info.height
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-ss", f"{seek:.6f}",
                           "-copyts", "-i", str(info.path), "-map", "0:v:0", "-frames:v", "1", "-f", "rawvideo",
                           "-pix_fmt", "rgb24", "-"], capture_output=True)
    if len(proc.stdout) < width * height * 3:
        raise VideoError(f"Could not decode frame {index} of {info.path.name}: "
                         f"{proc.stderr.decode('utf-8', 'replace').strip()[-300:] or 'no picture'}")
    return np.frombuffer(proc.stdout[: width * height * 3], np.uint8).reshape(height, width, 3)


def frame_at(source: str | os.PathLike | VideoInfo, t: float, max_width: int | None = None,
             proxy: Path | None = None) -> np.ndarray:
    """RGB frame on screen at time t seconds (see the module's time convention), at most `max_width` wide.

    Previews are cached, so stepping back and forth over the same frames costs nothing. Pass the source's preview
    proxy (preview_proxy_path) for random access in well under 150 ms on long high-resolution sources.
    """
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    index = info.frame_index_at(t)
    use_proxy = proxy if proxy is not None and proxy.exists() and max_width and max_width <= PROXY_WIDTH else None
    key = (info.path, info.frame_count, info.duration, index, max_width, use_proxy is not None)
    with _CACHE_LOCK:
        if key in _FRAMES:
            _FRAMES.move_to_end(key)
            return _FRAMES[key]
    frame = _resize_to_width(read_frame(info, index, use_proxy), max_width)
    frame.setflags(write=False)
    with _CACHE_LOCK:
        _FRAMES[key] = frame
        while len(_FRAMES) > FRAME_CACHE_SIZE:
            _FRAMES.popitem(last=False)
    return frame


PROXY_WIDTH = 640  # pixels; preview proxies are this wide (or the source's width if smaller)
PROXY_RATE = 25  # proxies number frames at a constant rate, so frame i of the proxy is frame i of the source
PROXY_VERSION = 2  # in the proxy's name: version 1 could repeat a source's first frame, so it is built again
PROXY_KEYINT = 12  # a keyframe every 12 frames: any frame is at most 11 cheap decodes away


def preview_proxy_path(info: VideoInfo, cache_dir: str | os.PathLike) -> Path:
    """Where the preview proxy of this exact source file (path, size, date) lives under cache_dir."""
    stat = info.path.stat()
    key = f"{info.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|proxy-v{PROXY_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return CacheLayout(Path(cache_dir)).previews_dir / f"{info.path.stem}-{digest}.mp4"


def build_preview_proxy(source: str | os.PathLike | VideoInfo, cache_dir: str | os.PathLike, *,
                        on_progress: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> Path:
    """Make (once) a small, short-GOP copy of the source with exactly one frame per source frame, for fast random
    access while scrubbing; long GOPs of films otherwise cost seconds per seek. Returns its path.

    Nothing is left behind when it fails or is stopped (should_stop() -> True raises InterruptedError).
    """
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    target = preview_proxy_path(info, cache_dir)
    if target.exists():
        return target
    width = min(PROXY_WIDTH, info.width - info.width % 2)
    with atomic_path(target, suffix=".part.mp4") as tmp:
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(info.path),
               # Renumber the frames in a 1/PROXY_RATE time base, so that timestamps are exact and the fps filter
               # only sets durations; passthrough and the frame count stop ffmpeg's rate conversion from repeating
               # a frame (it repeated the first of a 16 fps MP4, showing every later frame one early).
               "-map", "0:v:0", "-vf",
               f"settb=1/{PROXY_RATE},setpts=N,fps={PROXY_RATE},scale={width}:-2:flags=bilinear",
               "-fps_mode", "passthrough", "-frames:v", str(info.frame_count), "-an", "-sn", "-c:v", "libx264", "-preset",
               "ultrafast", "-tune", "fastdecode", "-g", str(PROXY_KEYINT), "-bf", "0", "-crf", "26",
               "-pix_fmt", "yuv420p", "-progress", "pipe:1", "-nostats", str(tmp)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        stopped = False
        for line in proc.stdout:
            if should_stop is not None and should_stop():
                stopped = True
                proc.kill()
                break
            if line.startswith(b"frame=") and on_progress is not None:
                done = int(line.split(b"=")[1] or 0)
                on_progress(min(1.0, done / info.frame_count), f"preview copy: frame {done}/{info.frame_count}")
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.wait()
        if stopped:
            raise InterruptedError(f"Preview copy of {info.path.name} stopped.")
        if proc.returncode != 0:
            raise VideoError(f"Could not make a preview copy of {info.path.name}: {err.strip()[-300:]}")
    return target


def thumbnails(source: str | os.PathLike | VideoInfo, count: int = 12, width: int = 160,
               proxy: Path | None = None) -> list[tuple[float, np.ndarray]]:
    """`count` evenly spaced (time, RGB frame) pairs over the whole video, each `width` pixels wide."""
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    times = [info.duration * (i + 0.5) / count for i in range(count)]
    return [(t, frame_at(info, t, max_width=width, proxy=proxy)) for t in times]


def format_time(seconds: float) -> str:
    """hh:mm:ss.mmm, the timestamps file's notation."""
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"
