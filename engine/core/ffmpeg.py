"""The ffmpeg binary (shipped by imageio-ffmpeg, so users need no system install) and a raw-frame video writer."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np

from engine.core.files import atomic_path


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class FFmpegError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its log."""


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float, crf: int = 18) -> Path:
    """Encode RGB uint8 frames (H, W, 3, all the same size, even sides) to H.264 yuv420p mp4, atomically."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("write_video got no frames")
    height, width = first.shape[:2]
    path = Path(path)
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "-", "-an", "-c:v", "libx264", "-preset", "veryfast",
               "-crf", str(crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(tmp)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for frame in _chain(first, frames):
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:  # the frame source failed: stop the encoder; atomic_path discards the partial file
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode("utf-8", "replace")
        if proc.wait() != 0:
            raise FFmpegError(f"encoding {path.name} failed: {err.strip()[-2000:]}")
    return path


def _chain(first: np.ndarray, rest) -> Iterable[np.ndarray]:
    yield first
    yield from rest
