"""Training data: scan clips and captions, validate them, assign buckets, and cache what the encoders make of them.

Stages (each a function the trainer, the Train tab's pre-flight and tests call alike):
1. `scan_dataset(cfg)` lists every clip of the dataset config's [[directory]] folders with its caption, checks it
   (errors block training, warnings don't) and assigns each clip its frame, aspect and resolution buckets the way
   diffusion-pipe does.
2. `cache_dataset(...)` encodes each item once and stores it in the project's cache/ as safetensors:
   - latents/<key>.safetensors: normalised VAE latents of the clip, the I2V condition (4-channel first-frame mask +
     latents of the first frame followed by zero frames) and the CLIP image context of the first frame;
   - text/<key>.safetensors: UMT5 embeddings of the caption, cut to its real length and zero-padded to 512 tokens.
   Keys hash the content (clip bytes or caption text), the model and the settings, so a changed caption re-encodes
   only its text and a changed clip only its latents. Each encoder is loaded only if something is missing, used,
   and freed before the next one. All of it matches what `WanImageToVideoPipeline` computes at inference.
3. `CachedDataset.batch_order(...)` gives deterministic same-bucket batches with num_repeats applied, per rank.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.config import DatasetConfig
from engine.files import atomic_path
from engine.project import list_videos
from engine.video import VideoError, VideoInfo, probe_video

WAN_FPS = 16.0  # Wan 2.1 is trained at 16 fps: clips are resampled to it
TEXT_TOKENS = 512  # the transformer splits text from image context at 512 tokens
SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
CACHE_VERSION = 1  # bump when the way cached tensors are computed changes
VIDEO_CLIP_MODES = ("single_beginning", "single_middle", "multiple_overlapping")

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message lists the problems, file by file."""


class CachingStopped(RuntimeError):
    """should_stop() asked caching to stop; files written so far are complete and will be reused."""


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


def frame_windows(frames: int, buckets: list[int], mode: str) -> list[tuple[int, int]]:
    """(bucket, start) windows of a clip of `frames` frames: the longest bucket it fills, placed per mode."""
    fitting = [b for b in buckets if b <= frames]
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


def _source_indices(info: VideoInfo, start: int, count: int) -> list[int]:
    """File frame numbers of 16-fps frames start..start+count-1 (the frame on screen at each 1/16 s)."""
    if abs(info.fps - WAN_FPS) < 0.01:
        return list(range(start, start + count))
    return [info.frame_index_at(i / WAN_FPS) for i in range(start, start + count)]


def _decodes(path: Path) -> bool:
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.isOpened() and capture.read()[0]
    finally:
        capture.release()


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
            clip = _scan_clip(path, index, directory.num_repeats, report)
            if clip is None:
                continue
            report.clips.append(clip)
            windows = frame_windows(clip.wan_frames, settings["frame_buckets"], video_clip_mode)
            if not windows:
                shortest = min(settings["frame_buckets"])
                report.errors.append(DatasetIssue(path, (
                    f"{clip.wan_frames} frames at 16 fps, shorter than the smallest frame bucket ({shortest}): "
                    f"export it with at least {shortest} frames ({shortest / WAN_FPS:.4g} s) or add a smaller "
                    "bucket to frame_buckets.")))
                continue
            for height, width in size_buckets(settings, clip.width, clip.height):
                for bucket_frames, start in windows:
                    report.items.append(DatasetItem(clip, (bucket_frames, height, width), start))
    if not report.items and not report.errors:
        report.errors.append(DatasetIssue(cfg.source or Path("dataset"), "the dataset has no usable clips."))
    return report


def _scan_clip(path: Path, directory: int, repeats: int, report: DatasetReport) -> ClipInfo | None:
    caption_file = path.with_suffix(".txt")
    try:
        info = probe_video(path)
    except VideoError as err:
        report.errors.append(DatasetIssue(path, f"cannot be read: {err}"))
        return None
    if not _decodes(path):
        report.errors.append(DatasetIssue(path, f"cannot be decoded ({info.codec}): re-export it as H.264 mp4."))
        return None
    if not caption_file.is_file():
        report.errors.append(DatasetIssue(path, f"no caption file {caption_file.name} beside it: write one in the "
                                                "Captions tab."))
        return None
    caption = caption_file.read_text(encoding="utf-8").strip()
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
    """The item's frames as RGB uint8 [F, H, W, 3]: resampled to 16 fps, window cut, fitted to the bucket."""
    frames, height, width = item.bucket
    info = probe_video(item.clip.path)
    wanted = _source_indices(info, item.start, frames)
    needed = set(wanted)
    decoded: dict[int, np.ndarray] = {}
    capture = cv2.VideoCapture(str(item.clip.path))
    try:
        index = 0
        while index <= max(wanted):
            ok, frame = capture.read()
            if not ok:
                break
            if index in needed:
                decoded[index] = fit_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), height, width)
            index += 1
    finally:
        capture.release()
    if len(decoded) < len(needed):
        raise DatasetError(f"{item.clip.path.name}: could decode only {index} frames, {max(wanted) + 1} needed. "
                           "The file may be damaged: export the clip again.")
    return np.stack([decoded[i] for i in wanted])


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, F, H, W] in [-1, 1], with diffusers' image processor arithmetic."""
    pixels = torch.from_numpy(frames.astype(np.float32) / 255.0)
    return (2.0 * pixels - 1.0).permute(3, 0, 1, 2).unsqueeze(0)


# -------------------------------------------------------------------------------------------------- caching

@dataclass(frozen=True)
class CachedItem:
    clip: Path
    bucket: tuple[int, int, int]  # frames, height, width (pixels)
    latent_file: Path  # latents, condition, image_embeds
    text_file: Path  # text_embeds
    repeats: int
    caption: str = ""
    start: int = 0


class CachedDataset:
    """Cached training items; tensors are read from disk on demand."""

    def __init__(self, items: list[CachedItem], cache_dir: Path):
        self.items = items
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        """A short hash of the data trained on (content, buckets, repeats), for LoRA metadata."""
        text = json.dumps([[i.latent_file.name, i.text_file.name, i.repeats] for i in self.items])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def missing_files(self) -> list[Path]:
        """Cache files not written yet (other ranks' shares while they are still caching)."""
        files = {f for item in self.items for f in (item.latent_file, item.text_file)}
        return sorted(f for f in files if not f.is_file())

    def load(self, item: CachedItem | int) -> dict[str, torch.Tensor]:
        """latents [16, F, H, W], condition [20, F, H, W], image_embeds [N, D_clip], text_embeds [512, D_text]."""
        from safetensors.torch import load_file

        item = self.items[item] if isinstance(item, int) else item
        return {**load_file(item.latent_file), **load_file(item.text_file)}

    def batch_order(self, epoch: int, seed: int, batch_size: int, rank: int = 0,
                    world_size: int = 1) -> list[list[int]]:
        """Batches of item indices for one epoch: each batch from one bucket, every item `repeats` times, shuffled
        by (seed, epoch). With several ranks, rank r gets every world_size-th batch; the list is padded by wrapping
        round so every rank gets the same number of batches (ranks must step together)."""
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        rng = np.random.default_rng([seed, epoch])
        by_bucket: dict[tuple[int, int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            members = [by_bucket[bucket][i] for i in rng.permutation(len(by_bucket[bucket]))]
            batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if world_size > 1 and batches:
            padded = -(-len(batches) // world_size) * world_size
            batches = [batches[i % len(batches)] for i in range(padded)]
        return batches[rank::world_size]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_key(model_path: str | os.PathLike, parts: tuple[str, ...]) -> str:
    """Identity of the model components used: the folder or hub id, their config files' contents and their weight
    files' sizes and times (a replaced weight file means re-encoding; hashing gigabytes would be too slow)."""
    text = str(model_path)
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        text = str(folder.resolve())
        for part in parts:
            for config in sorted((folder / part).glob("*.json")):
                text += config.read_text(encoding="utf-8", errors="replace")
            for weights in sorted((folder / part).glob("*.safetensors")):
                text += f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _release_memory() -> None:
    """Give freed encoder memory back (call after the last reference is deleted)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_frames(frames: np.ndarray, vae, image_processor, image_encoder, *, device,
                  dtype) -> dict[str, torch.Tensor]:
    """VAE latents, I2V condition and CLIP image context of RGB uint8 frames [F, H, W, 3] (F = 4k+1, sides
    multiples of 16), as WanImageToVideoPipeline computes them."""
    pixels = frames_to_pixels(frames).to(device=device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(device, dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(device, dtype)

    def encode(video: torch.Tensor) -> torch.Tensor:
        return (vae.encode(video).latent_dist.mode().to(device=device, dtype=dtype) - mean) * inv_std

    latents = encode(pixels)
    # Condition as the pipeline builds it: the first frame, then zeros (mid-grey in [-1, 1] pixel space).
    condition_video = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
    condition = encode(condition_video)
    num_frames, (latent_h, latent_w) = pixels.shape[2], condition.shape[-2:]
    temporal = 2 ** sum(vae.config.temperal_downsample)  # pixel frames per latent frame (4 for Wan)
    mask = torch.ones(1, 1, num_frames, latent_h, latent_w)
    mask[:, :, 1:] = 0
    # The first pixel frame is repeated so each latent frame's 4 mask channels cover its 4 pixel frames.
    mask = torch.cat([torch.repeat_interleave(mask[:, :, :1], repeats=temporal, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, latent_h, latent_w).transpose(1, 2).to(condition.device)
    condition = torch.cat([mask, condition], dim=1)

    from PIL import Image

    inputs = image_processor(images=Image.fromarray(frames[0]), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=device, dtype=image_encoder.dtype)
    image_embeds = image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    return {"latents": latents[0].to(dtype), "condition": condition[0].to(dtype),
            "image_embeds": image_embeds[0].to(dtype)}


@torch.no_grad()
def encode_caption(caption: str, tokenizer, text_encoder, *, device, dtype) -> torch.Tensor:
    """UMT5 embeddings [512, D] of a caption: cleaned as the pipeline does, cut to its real length, zero-padded."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    inputs = tokenizer([prompt_clean(caption)], padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    length = int(inputs.attention_mask.gt(0).sum())
    hidden = text_encoder(inputs.input_ids.to(device), inputs.attention_mask.to(device)).last_hidden_state
    hidden = hidden[0, :length].to(dtype=dtype)
    return torch.cat([hidden, hidden.new_zeros(TEXT_TOKENS - length, hidden.shape[1])])


def cache_dataset(cfg: DatasetConfig, model_path: str | os.PathLike, cache_dir: str | os.PathLike, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, rank: int = 0,
                  world_size: int = 1, video_clip_mode: str = "single_beginning", report: DatasetReport | None = None,
                  on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> CachedDataset:
    """Encode every item of the dataset that is not cached yet; return the full CachedDataset.

    Raises DatasetError if the scan has errors, CachingStopped if should_stop() says so. With several ranks each
    encodes every world_size-th missing file; the returned dataset lists all files, so wait for the others (a
    barrier, or until `missing_files()` is empty) before training.
    """
    from engine.models import load_wan_image_encoder, load_wan_text_encoder, load_wan_vae

    progress = on_progress or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    report = report or scan_dataset(cfg, video_clip_mode=video_clip_mode)
    if report.errors:
        raise DatasetError("The dataset has problems to fix before training:\n"
                           + "\n".join(f"- {issue.file}: {issue.message}" for issue in report.errors))
    cache_dir = Path(cache_dir)
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    vision_key = _model_key(model_path, ("vae", "image_encoder", "image_processor"))
    text_key = _model_key(model_path, ("text_encoder", "tokenizer"))

    progress(0.0, "Hashing clips")
    clip_hashes = {clip.path: _sha256_file(clip.path) for clip in report.clips}
    cached: list[CachedItem] = []
    latent_jobs: dict[Path, DatasetItem] = {}
    text_jobs: dict[Path, str] = {}
    for item in report.items:
        latent_file = cache_dir / "latents" / (_key(
            clip=clip_hashes[item.clip.path], model=vision_key, bucket=item.bucket, start=item.start, fps=WAN_FPS,
            dtype=dtype_name, version=CACHE_VERSION) + ".safetensors")
        text_file = cache_dir / "text" / (_key(
            caption=item.clip.caption, model=text_key, tokens=TEXT_TOKENS, dtype=dtype_name,
            version=CACHE_VERSION) + ".safetensors")
        cached.append(CachedItem(item.clip.path, item.bucket, latent_file, text_file, item.clip.num_repeats,
                                 item.clip.caption, item.start))
        latent_jobs.setdefault(latent_file, item)
        text_jobs.setdefault(text_file, item.clip.caption)

    # This rank's share: every world_size-th file, in a fixed order, of those not on disk yet.
    latent_todo = [(f, latent_jobs[f]) for i, f in enumerate(sorted(latent_jobs)) if i % world_size == rank
                   and not f.is_file()]
    text_todo = [(f, text_jobs[f]) for i, f in enumerate(sorted(text_jobs)) if i % world_size == rank
                 and not f.is_file()]
    total = max(1, len(latent_todo) + len(text_todo))
    done = 0
    if (latent_todo or text_todo) and stop():
        raise CachingStopped("Caching stopped before it began.")

    if latent_todo:
        progress(0.0, "Loading the VAE and the CLIP image encoder")
        vae = load_wan_vae(model_path, torch_dtype=dtype).to(device).eval()
        image_processor, image_encoder = load_wan_image_encoder(model_path, torch_dtype=dtype)
        image_encoder = image_encoder.to(device).eval()
        try:
            for path, item in latent_todo:
                if stop():
                    raise CachingStopped(f"Caching stopped after {done} of {total} files.")
                progress(done / total, f"Encoding {item.clip.path.name} ({item.bucket[0]} frames, "
                                       f"{item.bucket[2]}x{item.bucket[1]})")
                tensors = encode_frames(read_item_frames(item), vae, image_processor, image_encoder, device=device,
                                        dtype=dtype)
                _save(tensors, path, {"clip": str(item.clip.path), "bucket": json.dumps(item.bucket),
                                      "start": str(item.start), "model": str(model_path)})
                done += 1
        finally:
            del vae, image_encoder
            _release_memory()

    if text_todo:
        progress(done / total, "Loading the UMT5 text encoder")
        tokenizer, text_encoder = load_wan_text_encoder(model_path, torch_dtype=dtype)
        text_encoder = text_encoder.to(device).eval()
        try:
            for path, caption in text_todo:
                if stop():
                    raise CachingStopped(f"Caching stopped after {done} of {total} files.")
                progress(done / total, f"Encoding caption: {caption[:60]}")
                embeds = encode_caption(caption, tokenizer, text_encoder, device=device, dtype=dtype)
                _save({"text_embeds": embeds}, path, {"caption": caption, "model": str(model_path)})
                done += 1
        finally:
            del text_encoder
            _release_memory()

    progress(1.0, f"Cache ready: {len(cached)} items ({done} files encoded, the rest reused)")
    return CachedDataset(cached, cache_dir)
