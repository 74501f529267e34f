"""Caching: VAE latents, the I2V first-frame condition, CLIP image (Wan 2.1 only: Wan 2.2 has no image encoder) and
UMT5 text embeddings as safetensors in cache/, keyed by content, model and settings."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.families import family_of
from engine.core.files import atomic_path, file_sha256, remove_stale_temps
from engine.core.layout import CacheLayout
from engine.core.models import normalize_latents
from engine.core.progress import ProgressFn, StopFn
from engine.training.dataset import (
    WAN_FPS,
    DatasetError,
    DatasetItem,
    DatasetReport,
    frames_to_pixels,
    read_item_frames,
    scan_dataset,
)
from engine.training.objective import TEXT_TOKENS
from engine.training.schema import DatasetConfig

CACHE_VERSION = 1  # bump when the way cached tensors are computed changes


class CachingStopped(RuntimeError):
    """should_stop() asked caching to stop; files written so far are complete and will be reused."""


# -------------------------------------------------------------------------------------------------- caching

@dataclass(frozen=True)
class CachedItem:
    clip: Path
    bucket: tuple[int, int, int]  # frames, height, width (pixels)
    latent_file: Path  # latents, condition, image_embeds (families with a CLIP image encoder)
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

    def bucket_counts(self) -> dict[tuple[int, int, int], int]:
        """Items per (frames, height, width) bucket, repeats included (as DatasetReport.bucket_counts)."""
        counts: dict[tuple[int, int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
        return dict(sorted(counts.items()))

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
        """latents [16, F, H, W], condition [20, F, H, W], text_embeds [512, D_text], and image_embeds [N, D_clip]
        for a family with a CLIP image encoder (Wan 2.1)."""
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
    multiples of 16), as WanImageToVideoPipeline computes them. Without an image encoder (Wan 2.2, which conditions
    through the latent only) there is no `image_embeds`."""
    pixels = frames_to_pixels(frames).to(device=device, dtype=vae.dtype)

    def encode(video: torch.Tensor) -> torch.Tensor:
        return normalize_latents(vae, vae.encode(video).latent_dist.mode().to(device=device, dtype=dtype))

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
    encoded = {"latents": latents[0].to(dtype), "condition": condition[0].to(dtype)}
    if image_encoder is None:
        return encoded

    from PIL import Image

    inputs = image_processor(images=Image.fromarray(frames[0]), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=device, dtype=image_encoder.dtype)
    image_embeds = image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    return {**encoded, "image_embeds": image_embeds[0].to(dtype)}


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
    from engine.core.models import load_wan_image_encoder, load_wan_text_encoder, load_wan_vae

    progress = on_progress or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    report = report or scan_dataset(cfg, video_clip_mode=video_clip_mode)
    if report.errors:
        raise DatasetError("The dataset has problems to fix before training:\n"
                           + "\n".join(f"- {issue.file}: {issue.message}" for issue in report.errors))
    cache = CacheLayout(Path(cache_dir))
    remove_stale_temps(cache.root, recursive=True)  # files half-written by a caching that was killed
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    vision_key = _model_key(model_path, ("vae", "image_encoder", "image_processor"))
    text_key = _model_key(model_path, ("text_encoder", "tokenizer"))

    progress(0.0, "Hashing clips")
    clip_hashes = {clip.path: file_sha256(clip.path) for clip in report.clips}
    cached: list[CachedItem] = []
    latent_jobs: dict[Path, DatasetItem] = {}
    text_jobs: dict[Path, str] = {}
    for item in report.items:
        latent_file = cache.latents_dir / (_key(
            clip=clip_hashes[item.clip.path], model=vision_key, bucket=item.bucket, start=item.start, fps=WAN_FPS,
            dtype=dtype_name, version=CACHE_VERSION) + ".safetensors")
        text_file = cache.text_dir / (_key(
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
        progress(0.0, "Loading the VAE" + (" and the CLIP image encoder" if family_of(model_path).image_encoder
                                           else ""))
        vae = load_wan_vae(model_path, torch_dtype=dtype).to(device).eval()
        image_processor, image_encoder = load_wan_image_encoder(model_path, torch_dtype=dtype)
        if image_encoder is not None:
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
    return CachedDataset(cached, cache.root)
