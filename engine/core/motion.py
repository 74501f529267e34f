"""Motion: how fast things move in a video, as one measure in one unit wherever the studio shows it (the Clips tab's
suggestion scores and the Generate tab's readout), so a generated video can be compared with the clips it learnt from.

The measure: grey frames shrunk to at most MOTION_WIDTH pixels wide, sampled MOTION_RATE times a second; between
consecutive samples the mean Farneback optical-flow magnitude (OpenCV), expressed as a percentage of the frame width
per second (MOTION_UNIT). Neither the video's size nor its frame rate changes the number: a 1080p film at 24 fps and
a 480p generated video at 16 fps showing the same movement read the same.
"""

from __future__ import annotations

import cv2
import numpy as np

MOTION_WIDTH = 160  # pixels: motion (and scene changes) are judged on small grey frames, fast for a whole film
MOTION_RATE = 8.0  # samples per second
MOTION_UNIT = "% of frame width per second"
MOTION_UNIT_SHORT = "% width/s"


def motion_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the grey frames motion is measured on: at most MOTION_WIDTH wide, even sides, the aspect
    kept."""
    small = min(MOTION_WIDTH, width - width % 2)
    return small, max(2, int(round(height * small / width / 2)) * 2)


def flow_speed(previous: np.ndarray, current: np.ndarray, seconds_apart: float) -> float:
    """Motion between two grey uint8 frames [H, W] of motion_size, `seconds_apart` seconds apart, in MOTION_UNIT."""
    flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return 100.0 * float(np.linalg.norm(flow, axis=2).mean()) / previous.shape[1] / seconds_apart


def sample_indices(frame_count: int, fps: float) -> list[int]:
    """Indices of the frames on screen at each sample time k / MOTION_RATE of a constant-rate video (the Clips
    analysis reads a source the same way)."""
    times = np.arange(0.0, frame_count / fps, 1.0 / MOTION_RATE)
    return [min(frame_count - 1, int(np.floor(t * fps + 1e-6))) for t in times]


def video_motion(frames: np.ndarray, fps: float) -> float:
    """Mean motion of RGB uint8 frames [F, H, W, 3] played at `fps`, in MOTION_UNIT (0.0 for fewer than 2 samples)."""
    if fps <= 0:
        raise ValueError(f"video_motion: fps must be positive, not {fps}.")
    indices = sample_indices(len(frames), fps)
    if len(indices) < 2:
        return 0.0
    size = motion_size(frames.shape[2], frames.shape[1])
    greys = [cv2.resize(cv2.cvtColor(np.ascontiguousarray(frames[i]), cv2.COLOR_RGB2GRAY), size,
                        interpolation=cv2.INTER_AREA) for i in indices]
    return float(np.mean([flow_speed(a, b, 1.0 / MOTION_RATE) for a, b in zip(greys, greys[1:])]))
