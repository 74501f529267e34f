"""Captioners that suggest a caption from a clip's frames (BLIP-2 through transformers), and batch suggestion."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from engine.captions.store import CaptionStore
from engine.captions.style import StyleRules, apply_style, split_phrases
from engine.captions.text import CaptionError
from engine.core.hardware import default_device
from engine.core.models import load_blip2
from engine.core.progress import ProgressFn, StopFn, never_stop, no_progress
from engine.core.video import VideoError, probe_video, read_frames


class ClipDecodeError(CaptionError):
    """A clip whose frames cannot be read."""


class CaptionerOutOfMemory(RuntimeError):
    """The captioner ran out of GPU memory; the message names the settings that reduce memory."""


# ---------------------------------------------------------------------------------------------- captioners

class Captioner(Protocol):
    """What the studio needs from a captioner. Two kinds plug in: an image captioner (BLIP-2) has
    `caption_images`; a video captioner (engine.captions.vlm) has `reads_video = True`, `read_clip(path)` and
    `caption(videos)`. `suggest_captions` drives both."""

    name: str

    def caption_images(self, images: Sequence[np.ndarray], prompt: str = "") -> list[str]:
        """One caption per RGB uint8 image (H, W, 3) (image captioners)."""

    def unload(self) -> None:
        """Free the model's memory; the next call loads it again."""


@dataclass
class CaptionerSettings:
    frames_per_clip: int = 3  # frames captioned per clip (first, middle, last for 3), merged into one suggestion
    prompt: str = ""  # optional text the captioner continues, e.g. "a video of"; empty: plain captioning
    batch_size: int = 8  # frames per forward pass; lower it when the GPU runs out of memory

    def validate(self) -> None:
        if not 1 <= self.frames_per_clip <= 32:
            raise CaptionError(f"frames per clip must be 1..32, not {self.frames_per_clip}.")
        if self.batch_size < 1:
            raise CaptionError(f"batch size must be at least 1, not {self.batch_size}.")


class Blip2Captioner:
    """BLIP-2 (a local folder or hub id) loaded on first use and kept until `unload()`; fp16 on GPU, float32 on CPU."""

    def __init__(self, source: str | Path, device: str | torch.device | None = None, max_new_tokens: int = 30,
                 min_new_tokens: int = 3, batch_size: int = 8):
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise CaptionError(f"caption length: need 0 <= min new tokens ({min_new_tokens}) <= max new tokens "
                               f"({max_new_tokens}).")
        self.source = str(source)
        self.name = Path(self.source).name or self.source
        self.device = device or default_device()
        self.max_new_tokens = max_new_tokens  # caption length limit per frame, in captioner tokens
        self.min_new_tokens = min_new_tokens  # a caption of at least a few tokens: never an empty suggestion
        self.batch_size = batch_size
        self._processor = None
        self._model = None

    @classmethod
    def from_loaded(cls, processor, model, name: str, **kwargs) -> "Blip2Captioner":
        """Wrap a processor and model built in memory (benchmarks with random weights); `name` is what reloads."""
        captioner = cls(name, device=str(model.device), **kwargs)
        captioner._processor, captioner._model = processor, model
        return captioner

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is None:
            self._processor, self._model = load_blip2(self.source, device=self.device)

    def unload(self) -> None:
        import gc

        self._processor = self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def caption_images(self, images: Sequence[np.ndarray], prompt: str = "") -> list[str]:
        from PIL import Image

        self.load()
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in chunk]
            inputs = self._processor(images=batch, text=[prompt] * len(batch) if prompt else None, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            output = generate_tokens(
                self._model, inputs, self.max_new_tokens, self.min_new_tokens,
                f"The GPU ran out of memory captioning {len(batch)} frames with {self.name}. Lower 'batch size' "
                f"(now {self.batch_size}) or 'frames per clip', stop other GPU jobs, or caption on the CPU.")
            # generate() returns the input tokens (image tokens, prompt) followed by the new ones.
            new_tokens = output[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else output
            captions.extend(t.strip() for t in self._processor.batch_decode(new_tokens, skip_special_tokens=True))
        return captions


def generate_tokens(model, inputs: dict, max_new_tokens: int, min_new_tokens: int, out_of_memory: str):
    """Greedy `model.generate(**inputs)` with min/max new tokens; a GPU out of memory is raised as
    CaptionerOutOfMemory with the message `out_of_memory` (the settings that lower memory)."""
    import torch

    try:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                  do_sample=False)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise CaptionerOutOfMemory(out_of_memory) from err


def read_clip_frames(clip: str | Path, count: int = 3) -> list[np.ndarray]:
    """`count` RGB frames spread evenly over the clip (first, middle, last for 3), as shown (engine.core.video).

    Raises ClipDecodeError naming the clip when it cannot be read or decoded."""
    try:
        info = probe_video(clip)
        wanted = sorted(int(round(i)) for i in np.linspace(0, info.frame_count - 1, count))
        return list(read_frames(info, wanted))
    except VideoError as err:
        raise ClipDecodeError(f"{err} Re-cut or re-encode the clip.") from None


def merge_captions(captions: Iterable[str]) -> str:
    """One caption from several frames' captions: their phrases, with repeats and phrases inside others dropped."""
    kept: list[str] = []
    for caption in captions:
        for phrase in split_phrases(caption):
            key = f" {phrase.casefold()} "
            if any(key in f" {k.casefold()} " for k in kept):
                continue
            kept = [k for k in kept if f" {k.casefold()} " not in key]  # a longer phrase replaces a shorter one
            kept.append(phrase)
    return ", ".join(kept)


def caption_clip(captioner: Captioner, clip: str | Path, settings: CaptionerSettings | None = None) -> str:
    settings = settings or CaptionerSettings()
    frames = read_clip_frames(clip, settings.frames_per_clip)
    return merge_captions(captioner.caption_images(frames, settings.prompt))


@dataclass
class SuggestReport:
    suggested: dict[str, str] = field(default_factory=dict)  # clip -> suggestion
    written: list[str] = field(default_factory=list)  # clips whose caption file was written (write_captions)
    skipped: list[str] = field(default_factory=list)  # clips left out because they have a caption
    failed: dict[str, str] = field(default_factory=dict)  # clip -> why (e.g. cannot be decoded)
    stopped: bool = False


def suggest_captions(store: CaptionStore, captioner: Captioner, *, clips: Sequence[str] | None = None,
                     overwrite: bool = False, write_captions: bool = False,
                     settings: CaptionerSettings | None = None, rules: StyleRules | None = None,
                     on_progress: ProgressFn = no_progress, should_stop: StopFn = never_stop) -> SuggestReport:
    """Caption clips and store each result as a pending suggestion.

    Only clips without a caption are done unless `overwrite` is set. With `write_captions` (the command line) the
    suggestion is also written as the caption, the previous text (if any) kept in history. With `rules` (the
    project's pure-style rules) each answer passes through them before it is suggested. Clips that cannot be
    decoded are reported in `failed` and skipped. An image captioner (BLIP-2) captions `frames_per_clip` frames
    per clip, several clips' frames in one forward pass; a video captioner (`reads_video`) watches each clip whole.
    """
    settings = settings or CaptionerSettings()
    settings.validate()
    report = SuggestReport()
    todo = []
    for clip in clips if clips is not None else store.list_clips():
        current = store.read(clip)
        if not current.readable:
            report.failed[Path(clip).name] = current.message
        elif current.text and not overwrite:
            report.skipped.append(Path(clip).name)
        else:
            todo.append(Path(clip).name)
    reads_video = getattr(captioner, "reads_video", False)
    per_batch = 1 if reads_video else max(1, getattr(captioner, "batch_size", settings.batch_size)
                                          // settings.frames_per_clip)
    on_progress(0.0, f"captioning {len(todo)} clips")
    for start in range(0, len(todo), per_batch):
        if should_stop():
            report.stopped = True
            break
        names, inputs = [], []
        for clip in todo[start:start + per_batch]:
            try:
                path = store.clip_path(clip)
                inputs.append(captioner.read_clip(path) if reads_video
                              else read_clip_frames(path, settings.frames_per_clip))
                names.append(clip)
            except CaptionError as err:
                report.failed[clip] = str(err)
        for clip, text in zip(names, _caption_batch(captioner, inputs, settings, reads_video)):
            if rules is not None and text:
                text = apply_style(text, rules)
            if not text:
                report.failed[clip] = "the captioner returned an empty caption"
                continue
            store.add_suggestion(clip, text, model=captioner.name)
            report.suggested[clip] = text
            if write_captions:
                store.save(clip, text, source="captioner")
                report.written.append(clip)
        done = min(start + per_batch, len(todo))
        on_progress(done / max(len(todo), 1), f"{done}/{len(todo)} clips captioned")
    return report


def _caption_batch(captioner, inputs: list, settings: CaptionerSettings, reads_video: bool) -> list[str]:
    """One caption per clip input: a video captioner's answers as they are, an image captioner's merged per clip."""
    if not inputs:
        return []
    if reads_video:
        return captioner.caption(inputs)
    captions = captioner.caption_images([frame for frames in inputs for frame in frames], settings.prompt)
    merged, offset = [], 0
    for frames in inputs:
        merged.append(merge_captions(captions[offset:offset + len(frames)]))
        offset += len(frames)
    return merged
