"""Video geometry and timing: probe, preview (with and without a proxy), cut and dataset reading all show what a
player shows. Edit lists (stream-copy trims, a phone's trim, B-frame delay), start times that are not zero,
non-square pixels (DVD and anamorphic sources, in MP4 and MKV) and rotation with non-square pixels, on the field
cases and on generated instances. The reference for "what a player shows" is the ffmpeg command's own decode
(decode_all), which is independent of the studio's reader."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.clips.cut import Cut, cut_clips
from engine.clips.suggest import analyze_motion
from engine.core.ffmpeg import ffmpeg_exe
from engine.core.video import FRAME_TIME_TOLERANCE, build_preview_proxy, frame_at, probe_video, read_frames
from engine.training.dataset import read_item_frames, scan_dataset
from engine.training.schema import DatasetConfig, DirectoryConfig
from tests.engine.test_clips_videos import decode_all, make_indexed_video, read_index

CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cases"


def ffmpeg(*args) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def on_screen(info, t: float) -> int:
    """Index of the frame shown at t, by the rule written out: the last frame whose time is <= t + 1 ms."""
    return max(i for i, ft in enumerate(info.frame_times) if ft <= t + FRAME_TIME_TOLERANCE)


def dataset_of(folder: Path, size: tuple[int, int], buckets: list[int]) -> DatasetConfig:
    return DatasetConfig(resolutions=[list(size)], ar_buckets=[list(size)], frame_buckets=buckets,
                         directory=[DirectoryConfig(path=str(folder))])


def assert_every_reader_agrees(video: Path, work: Path) -> list[int]:
    """Probe, read_frames, previews (source and proxy), a cut and dataset reading against the player's frames;
    returns the source numbers the player shows."""
    info = probe_video(video)
    shown = [read_index(f) for f in decode_all(video)]
    assert info.frame_count == len(shown), video.name
    assert [read_index(f) for f in read_frames(info, list(range(info.frame_count)))] == shown
    proxy = build_preview_proxy(info, work / "cache")
    for t in [0.0, 0.5, 0.77, info.duration - 0.01]:
        expected = shown[on_screen(info, t)]
        assert read_index(frame_at(info, t)) == expected, (video.name, t)
        assert read_index(frame_at(info, t, max_width=160, proxy=proxy)) == expected, (video.name, t, "proxy")
    clip = cut_clips(info.path, [Cut(0.0), Cut(0.5)], work / "clips", frames=9, size=None)
    for exported, start in zip(clip, [0.0, 0.5]):
        got = [read_index(f) for f in decode_all(exported.path)]
        assert got == [shown[on_screen(info, start + k / 16)] for k in range(9)], (video.name, start)
    folder = work / "dataset"
    folder.mkdir()
    (folder / video.name).write_bytes(video.read_bytes())
    (folder / video.name).with_suffix(".txt").write_text("sks motion", encoding="utf-8")
    report = scan_dataset(dataset_of(folder, (info.width // 16 * 16, info.height // 16 * 16), [9]))
    assert report.ok, report.summary()
    frames = read_item_frames(report.items[0])
    assert [read_index(f) for f in frames] == [shown[on_screen(info, k / 16)] for k in range(9)]
    return shown


def test_trimmed_mp4_edit_list_case(tmp_path):
    """Field case trimmed-mp4-edit-list: its edit list hides 6 decoded leading frames; a player shows source frames
    63..114. The cut at 0 s used to repeat its first frame 5 times and the cut at 0.5 s started 0.24 s early."""
    video = CASES / "trimmed-mp4-edit-list" / "trimmed_copy.mp4"
    shown = assert_every_reader_agrees(video, tmp_path)
    assert shown == list(range(63, 115))
    info = probe_video(video)
    assert info.frame_count == 52 and info.fps == 25 and info.frame_times[:2] == (0.0, 0.04)
    cut = cut_clips(video, [Cut(0.5)], tmp_path / "again", frames=17, size="160x112")[0]
    assert [read_index(f) for f in decode_all(cut.path)] == [63 + int((0.5 + k / 16) * 25 + 0.001) for k in range(17)]


EDIT_LISTS = {
    # stream copy from a point between keyframes: the edit list hides the frames decoded before it
    "stream-copy trim.mp4": ["-ss", "1.3", "-i", "{src}", "-c", "copy"],
    # a phone's "trim": start and end cut by stream copy into a MOV
    "phone trim.mov": ["-ss", "0.9", "-t", "1.6", "-i", "{src}", "-c", "copy"],
    # B-frame delay only: the edit list hides nothing the encoder made, it only starts at the first shown frame
    "b-frames.mp4": ["-i", "{src}", "-c", "copy"],
    # a camcorder stream remuxed with its clock: the first frame at 1.4 s is still t = 0
    "late start.mkv": ["-ss", "0.5", "-i", "{src}", "-c", "copy", "-output_ts_offset", "1.4"],
    # MKV keeps B-frame delays as timestamps that do not start at zero
    "b-frames.mkv": ["-ss", "1.0", "-i", "{src}", "-c", "copy"],
    # a trim kept with its negative timestamps (a packet without one, too)
    "negative start.mkv": ["-ss", "1.3", "-i", "{src}", "-c", "copy", "-avoid_negative_ts", "disabled"],
    # B-frame priming without an edit list: the first frame is shown 0.08 s into the file
    "no edit list.mp4": ["-ss", "1.3", "-i", "{src}", "-c", "copy", "-avoid_negative_ts", "disabled",
                         "-use_editlist", "0"],
}


@pytest.mark.parametrize("name", list(EDIT_LISTS))
def test_edit_lists_and_start_times(tmp_path, name):
    source = make_indexed_video(tmp_path / "source.mp4", "25", 100, extra=["-bf", "3", "-g", "25"])
    video = tmp_path / name
    ffmpeg(*[str(source) if a == "{src}" else a for a in EDIT_LISTS[name]], video)
    shown = assert_every_reader_agrees(video, tmp_path)
    assert shown == list(range(shown[0], shown[0] + len(shown)))  # consecutive source frames, none repeated
    info = probe_video(video)
    assert info.frame_times[0] == 0 and info.fps == pytest.approx(25, rel=1e-3) and not info.variable_frame_rate


def roundness(frame: np.ndarray) -> float:
    """Width over height of the bright region (1.0 for a circle as shown)."""
    bright = frame.mean(axis=2) > 127
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    return (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)


def test_anamorphic_case_uses_the_display_size_everywhere(tmp_path):
    """Field case anamorphic-source: 720x480 stored with 32:27 pixels (16:9 on screen). A circle came out 16 %
    narrow: probed as 720x480 and cut with square pixels."""
    video = CASES / "anamorphic-source" / "anamorphic_sar32-27.mp4"
    info = probe_video(video)
    assert (info.width, info.height, info.stored_width, info.sample_aspect_ratio) == (853, 480, 720, Fraction(32, 27))
    assert "32:27" in info.summary()["stored_as"] and info.summary()["resolution"] == "853x480"
    pictures = {"preview": frame_at(info, 1.0), "small preview": frame_at(info, 1.0, max_width=320),
                "proxy": frame_at(info, 1.0, max_width=320, proxy=build_preview_proxy(info, tmp_path / "cache"))}
    kept, cropped, stretched = (cut_clips(video, [Cut(1.0, name=n)], tmp_path / "clips", frames=5, size=s, crop=c)[0]
                                for n, s, c in [("kept", None, True), ("cropped", "832x480", True),
                                                ("stretched", "848x480", False)])
    assert (kept.width, kept.height) == (852, 480)
    for clip in (kept, cropped, stretched):
        pictures[clip.path.name] = decode_all(clip.path)[0]
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / video.name).write_bytes(video.read_bytes())
    (folder / video.name).with_suffix(".txt").write_text("a circle", encoding="utf-8")
    report = scan_dataset(dataset_of(folder, (256, 144), [33]))
    assert (report.clips[0].width, report.clips[0].height) == (853, 480)
    pictures["dataset"] = read_item_frames(report.items[0])[16]
    for where, picture in pictures.items():
        assert roundness(picture) == pytest.approx(1.0, abs=0.03), where


def make_circle_video(path: Path, sar: Fraction, stored=(180, 120), frames: int = 20) -> Path:
    """A white circle left of centre on black, stored squeezed by `sar` so that it is round on screen."""
    width, height = stored
    yy, xx = np.mgrid[0:height, 0:width]
    display_x = xx * float(sar)
    circle = (display_x - width * float(sar) * 0.35) ** 2 + (yy - height * 0.5) ** 2 < (height * 0.3) ** 2
    frame = np.repeat((circle * 255).astype(np.uint8)[..., None], 3, axis=2)
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-vf", f"setsar={sar}",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
                   input=frame.tobytes() * frames, check=True)
    return path


@pytest.mark.parametrize("container, sar, rotation", [("mkv", Fraction(32, 27), 0), ("mkv", Fraction(8, 9), 0),
                                                      ("mov", Fraction(32, 27), 90), ("mp4", Fraction(4, 3), 270)])
def test_pixel_aspect_in_containers_and_with_rotation(tmp_path, container, sar, rotation):
    plain = make_circle_video(tmp_path / "plain.mp4", sar)
    video = tmp_path / f"source.{container}"
    ffmpeg("-display_rotation", rotation, "-i", plain, "-c", "copy", video)
    info = probe_video(video)
    display = (round(180 * sar), 120)
    assert (info.width, info.height) == (display[::-1] if rotation in (90, 270) else display)
    assert (info.rotation, info.sample_aspect_ratio) == (rotation, sar)
    player = decode_all(video)[3].astype(int)  # ffmpeg rotates upright and scales to the display size
    ours = next(read_frames(info, [3])).astype(int)
    assert ours.shape == player.shape and np.abs(ours - player).mean() < 4
    assert roundness(ours) == pytest.approx(1.0, abs=0.05)
    clip = cut_clips(video, [Cut(0.1)], tmp_path / "clips", frames=5, size=None)[0]
    assert roundness(decode_all(clip.path)[0]) == pytest.approx(1.0, abs=0.05)
    _, motion, _ = analyze_motion(info)  # suggestions read the same frames: a still picture has no motion
    assert motion.max() < 0.5
