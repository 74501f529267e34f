"""Generated test videos whose frames carry their own index, as 10 black/white vertical bars (bit j = bar j), a code
that survives H.264 compression, scaling and rotation back to upright."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np

from engine.core.ffmpeg import ffmpeg_exe

BITS = 10


def indexed_frame(index: int, width: int = 160, height: int = 96) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    bar = width // BITS
    for bit in range(BITS):
        if index >> bit & 1:
            frame[:, bit * bar:(bit + 1) * bar] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index a frame carries (frame as displayed: rows x columns x RGB, any size with the bar layout)."""
    height, width = frame.shape[:2]
    grey = frame.mean(axis=2)
    value = 0
    for bit in range(BITS):
        center = int((bit + 0.5) * width / BITS)
        if grey[height // 4: 3 * height // 4, max(0, center - 2): center + 3].mean() > 127:
            value |= 1 << bit
    return value


def make_indexed_video(path: Path, rate: str, frames: int, *, size=(160, 96), pix_fmt="yuv420p",
                       codec="libx264", setpts: str | None = None, extra: list[str] = ()) -> Path:
    """Encode `frames` indexed frames at `rate` (ffmpeg rate text, e.g. '30000/1001'); setpts makes it VFR."""
    width, height = size
    data = b"".join(indexed_frame(i, width, height).tobytes() for i in range(frames))
    vf = ["-vf", f"setpts={setpts}", "-fps_mode", "vfr"] if setpts else []
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", rate, "-i", "-", *vf, "-c:v", codec, "-pix_fmt", pix_fmt,
           "-g", "48", *extra, str(path)]
    subprocess.run(cmd, input=data, check=True)
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame of a video as a player shows it, by the ffmpeg command (a reference independent of the studio's
    reader): frames an edit list hides dropped, rotated upright, scaled to the display size (square pixels)."""
    from engine.core.video import probe_video

    info = probe_video(path)
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0",
                          "-vf", f"scale={info.width}:{info.height}:flags=area,setsar=1",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    size = info.width * info.height * 3
    return [np.frombuffer(out[i:i + size], np.uint8).reshape(info.height, info.width, 3)
            for i in range(0, len(out) - size + 1, size)]


def make_scenes_video(path: Path, fps: int = 16) -> Path:
    """Three 3-second scenes on different backgrounds: still, a fast textured square, a slow one (160x96)."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 120, (96, 160), dtype=np.uint8), (0, 0), 3)[..., None] // 2
    patch = cv2.GaussianBlur(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), (0, 0), 2) // 2 + 128
    frames = []
    for scene, (base, speed) in enumerate([(20, 0.0), (80, 90.0), (50, 8.0)]):
        for i in range(3 * fps):
            frame = np.repeat(texture + base, 3, axis=2)
            x = int(10 + (speed * i / fps) % 110)
            frame[28:68, x:x + 40] = patch
            frames.append(frame)
    data = b"".join(f.tobytes() for f in frames)
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", "160x96", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
                   input=data, check=True)
    return path
