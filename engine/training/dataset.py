"""The dataset: scan clips and captions into a report with buckets and issues, and read an item's frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.captions.text import CaptionEncodingError, read_caption
from engine.core.layout import caption_file as caption_path
from engine.core.layout import list_videos
from engine.core.video import VideoError, VideoInfo, probe_video, read_frames
from engine.training.schema import DatasetConfig

WAN_FPS = 16.0  # Wan 2.1 is trained at 16 fps: clips are resampled to it




SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2


VIDEO_CLIP_MODES = ("single_beginning", "single_middle", "multiple_overlapping")






class DatasetError(ValueError):
    """The dataset cannot be trained on; the message lists the problems, file by file."""


# ------------------------------------------------------------------------------------------------- scanning

@dataclass(frozen=True)
class DatasetIssue:
    file: Path
    message: str

    def __str__(self) -> str:
        return f"{self.file.name}: {self.message}"


@dataclass(frozen=True)
class ClipInfo:
    """A clip with its caption, as found on disk."""

    path: Path
    caption_file: Path
    caption: str
    fps: float
    frame_count: int  # frames in the file
    wan_frames: int  # frames after resampling to 16 fps
    width: int
    height: int
    directory: int  # index of its [[directory]] entry
    num_repeats: int


@dataclass(frozen=True)
class DatasetItem:
    """One training example: a clip window resized to a bucket."""

    clip: ClipInfo
    bucket: tuple[int, int, int]  # frames, height, width
    start: int  # first frame of the window, counted at 16 fps


@dataclass
class DatasetReport:
    clips: list[ClipInfo] = field(default_factory=list)
    items: list[DatasetItem] = field(default_factory=list)
    errors: list[DatasetIssue] = field(default_factory=list)
    warnings: list[DatasetIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def bucket_counts(self) -> dict[tuple[int, int, int], int]:
        """Items per (frames, height, width) bucket, repeats included."""
        counts: dict[tuple[int, int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.clip.num_repeats
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        """A few lines for a person: counts, buckets, then every error and warning."""
        lines = [f"{len(self.clips)} clips, {sum(self.bucket_counts().values())} examples per epoch, "
                 f"{len(self.errors)} errors, {len(self.warnings)} warnings"]
        lines += [f"bucket {f} frames x {h}x{w}: {n}" for (f, h, w), n in self.bucket_counts().items()]
        lines += [f"error: {issue}" for issue in self.errors] + [f"warning: {issue}" for issue in self.warnings]
        return "\n".join(lines)


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def aspect_ratios(settings: dict) -> list[float]:
    """The width/height ratios of the aspect buckets (diffusion-pipe: explicit ar_buckets, else log-spaced)."""
    if settings["ar_buckets"]:
        return [item[0] / item[1] if isinstance(item, list) else float(item) for item in settings["ar_buckets"]]
    if not settings["enable_ar_bucket"]:
        return [1.0]
    count = settings["num_ar_buckets"]
    if count == 1:
        return [math.sqrt(settings["min_ar"] * settings["max_ar"])]
    return [float(r) for r in np.geomspace(settings["min_ar"], settings["max_ar"], count)]


def size_buckets(settings: dict, width: int, height: int) -> list[tuple[int, int]]:
    """(height, width) per resolution for a clip of this size: the aspect bucket nearest its own ratio, at each
    resolution's pixel area (N means N x N; [w, h] means w x h), sides multiples of 16."""
    ratios = aspect_ratios(settings)
    ratio = min(ratios, key=lambda r: abs(math.log(r) - math.log(width / height)))
    out = []
    for resolution in settings["resolutions"]:
        area = resolution[0] * resolution[1] if isinstance(resolution, list) else resolution * resolution
        out.append((round_to_multiple(math.sqrt(area / ratio)), round_to_multiple(math.sqrt(area * ratio))))
    return out


def video_buckets(buckets: list[int]) -> list[int]:
    """The frame buckets a video can go to: all but 1, which is for still images (diffusion-pipe's convention)."""
    return [b for b in buckets if b > 1]


def frame_windows(frames: int, buckets: list[int], mode: str) -> list[tuple[int, int]]:
    """(bucket, start) windows of a video clip of `frames` frames: the longest video bucket it fills, placed per
    mode; none when it is shorter than every video bucket (a video never trains as a one-frame still)."""
    fitting = [b for b in video_buckets(buckets) if b <= frames]
    if not fitting:
        return []
    bucket = max(fitting)
    if mode == "single_beginning":
        return [(bucket, 0)]
    if mode == "single_middle":
        return [(bucket, (frames - bucket) // 2)]
    count = math.ceil(frames / bucket)  # the fewest windows that cover the clip; they may overlap
    return [(bucket, int(round(s))) for s in np.linspace(0, frames - bucket, count)]


def _wan_frame_count(info: VideoInfo) -> int:
    if abs(info.fps - WAN_FPS) < 0.01:
        return info.frame_count
    return int(math.floor((info.duration - 1e-3) * WAN_FPS)) + 1


def scan_dataset(cfg: DatasetConfig, *, video_clip_mode: str = "single_beginning") -> DatasetReport:
    """Find every clip + caption of the dataset, check them and assign buckets. Never raises for bad data: every
    problem is in the report (errors block training, warnings don't)."""
    if video_clip_mode not in VIDEO_CLIP_MODES:
        raise ValueError(f"video_clip_mode must be one of {', '.join(VIDEO_CLIP_MODES)}, not {video_clip_mode!r}")
    report = DatasetReport()
    for index, directory in enumerate(cfg.directory):
        folder = cfg.directory_path(directory)
        settings = cfg.bucket_settings(directory)
        if not folder.is_dir():
            report.errors.append(DatasetIssue(folder, "clip folder not found: fix the [[directory]] path."))
            continue
        videos = list_videos(folder)
        if not videos:
            report.errors.append(DatasetIssue(folder, "no video clips (.mp4, .mkv, .mov, .webm, .avi) in this "
                                                      "folder: export clips in the Clips tab first."))
        for path in videos:
            clip = _scan_clip(path, index, settings["num_repeats"], report)
            if clip is None:
                continue
            report.clips.append(clip)
            windows = frame_windows(clip.wan_frames, settings["frame_buckets"], video_clip_mode)
            if not windows:
                report.errors.append(DatasetIssue(path, _too_short(clip.wan_frames, settings["frame_buckets"])))
                continue
            for height, width in size_buckets(settings, clip.width, clip.height):
                for bucket_frames, start in windows:
                    report.items.append(DatasetItem(clip, (bucket_frames, height, width), start))
    if not report.items and not report.errors:
        report.errors.append(DatasetIssue(cfg.source or Path("dataset"), "the dataset has no usable clips."))
    return report


def _too_short(frames: int, buckets: list[int]) -> str:
    length = f"{frames} frames at 16 fps ({frames / WAN_FPS:.3g} s)"
    if not video_buckets(buckets):
        return (f"{length}, but frame_buckets {buckets} has no video bucket (1 is for still images): add one such as "
                "33 or 81.")
    shortest = min(video_buckets(buckets))
    longest_fit = frames - (frames - 1) % 4  # the longest 4k+1 bucket this clip fills
    smaller = f", or add {longest_fit} to frame_buckets" if longest_fit > 1 else ""
    return (f"{length}, shorter than the smallest video frame bucket ({shortest}); a video never trains as a "
            f"one-frame still. Export it with at least {shortest} frames ({shortest / WAN_FPS:.4g} s){smaller}.")


def _scan_clip(path: Path, directory: int, repeats: int, report: DatasetReport) -> ClipInfo | None:
    caption_file = caption_path(path)
    try:
        info = probe_video(path)
    except VideoError as err:  # unreadable, or its first frame does not decode
        report.errors.append(DatasetIssue(path, f"cannot be read: {err}"))
        return None
    if not caption_file.is_file():
        report.errors.append(DatasetIssue(path, f"no caption file {caption_file.name} beside it: write one in the "
                                                "Captions tab."))
        return None
    try:
        caption = read_caption(caption_file)
    except CaptionEncodingError as err:
        report.errors.append(DatasetIssue(caption_file, err.detail + "."))
        return None
    if not caption:
        report.warnings.append(DatasetIssue(caption_file, "empty caption: this clip trains with no text."))
    wan_frames = _wan_frame_count(info)
    if abs(info.fps - WAN_FPS) >= 0.01:
        report.warnings.append(DatasetIssue(path, f"{info.fps:.3g} fps; resampled to 16 fps ({wan_frames} frames)."))
    if wan_frames % 4 != 1:
        report.warnings.append(DatasetIssue(path, f"{wan_frames} frames at 16 fps is not 4k+1 (e.g. 17, 33, 81): "
                                                  "frames beyond the frame bucket are not used."))
    if info.width % SIZE_MULTIPLE or info.height % SIZE_MULTIPLE:
        report.warnings.append(DatasetIssue(path, f"{info.width}x{info.height} is not a multiple of 16: it is "
                                                  "resized and centre-cropped to its bucket."))
    return ClipInfo(path, caption_file, caption, info.fps, info.frame_count, wan_frames, info.width, info.height,
                    directory, repeats)


# -------------------------------------------------------------------------------------------------- reading

def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a frame to cover height x width, then centre-crop it (no stretching)."""
    h, w = frame.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(frame[top:top + height, left:left + width])


def read_item_frames(item: DatasetItem) -> np.ndarray:
    """The item's frames as RGB uint8 [F, H, W, 3]: resampled to 16 fps (16-fps frame i is the clip's frame on
    screen at i / 16 s, as clips are cut), window cut, shown as a player shows them (edit lists, pixel aspect,
    rotation: engine.core.video), fitted to the bucket. Raises DatasetError naming a clip that fails to decode."""
    frames, height, width = item.bucket
    info = probe_video(item.clip.path)
    wanted = info.indices_at(item.start / WAN_FPS, frames, WAN_FPS)
    try:
        return np.stack([fit_frame(picture, height, width) for picture in read_frames(info, wanted)])
    except VideoError as err:
        raise DatasetError(f"{item.clip.path.name}: {err} Export the clip again.") from None


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, F, H, W] in [-1, 1], with diffusers' image processor arithmetic."""
    pixels = torch.from_numpy(frames.astype(np.float32) / 255.0)
    return (2.0 * pixels - 1.0).permute(3, 0, 1, 2).unsqueeze(0)
