"""Motion is one measure in one unit: the Clips tab's suggestion score of a video and the Generate tab's readout of
the same frames agree, and neither the video's size nor its frame rate changes the number."""

import cv2
import numpy as np
import pytest

from engine.clips.suggest import suggest_windows
from engine.core.ffmpeg import write_video
from engine.core.motion import MOTION_WIDTH, video_motion
from engine.generate.render import motion_readout


def textured_square(frames: int, fps: float, speed: float, size=(320, 192)) -> np.ndarray:
    """A textured square crossing a textured background at `speed` (fraction of the width per second): [F, H, W, 3]."""
    width, height = size
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 160, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    patch = cv2.GaussianBlur(rng.integers(60, 255, (height // 4, height // 4, 3), dtype=np.uint8), (0, 0), 2)
    video = np.repeat(background[None], frames, axis=0)
    for i in range(frames):
        x = int(round(width * 0.05 + speed * width * i / fps))
        video[i, height // 3: height // 3 + patch.shape[0], x: x + patch.shape[1]] = patch
    return video


def test_clips_suggestion_and_generate_readout_agree_on_the_same_clip(tmp_path):
    frames = textured_square(33, fps=16, speed=0.3)
    clip = write_video(frames, tmp_path / "generated.mp4", fps=16)  # what Generate writes; Clips may open it
    readout = video_motion(frames, fps=16)  # the Generate tab's number, from the frames in memory
    [window] = suggest_windows(clip, 1, frames=33, fps=16)  # the Clips tab's number: the whole clip is one window
    assert window.start == 0.0 and readout > 1.0
    assert window.score == pytest.approx(readout, rel=0.03)  # 3.64 and 3.637 here: only the codec between them


def test_motion_depends_on_movement_not_size_or_frame_rate():
    still = np.zeros((5, 32, 48, 3), dtype=np.uint8)
    still[:, 10:20, 10:20] = 255
    moving = np.stack([np.roll(still[0], shift=2 * t, axis=1) for t in range(5)])
    assert video_motion(still, fps=16) == 0.0
    assert video_motion(moving, fps=16) > 0.5

    base = video_motion(textured_square(33, fps=16, speed=0.15, size=(MOTION_WIDTH, 96)), fps=16)
    wide = video_motion(textured_square(33, fps=16, speed=0.15, size=(3 * MOTION_WIDTH, 288)), fps=16)
    faster_rate = video_motion(textured_square(50, fps=24, speed=0.15, size=(MOTION_WIDTH, 96)), fps=24)
    twice_as_fast = video_motion(textured_square(33, fps=16, speed=0.3, size=(MOTION_WIDTH, 96)), fps=16)
    assert wide == pytest.approx(base, rel=0.1) and faster_rate == pytest.approx(base, rel=0.1)
    assert twice_as_fast == pytest.approx(2 * base, rel=0.1)


def test_readout_names_its_unit_and_older_sidecars_say_theirs():
    assert motion_readout({"motion": 3.14159, "motion_unit": "% of frame width per second"}) == "3.14 % width/s"
    assert motion_readout({"motion": 1.5}).startswith("1.50 px/frame (an older measure")
    assert motion_readout({}) == "not recorded"
