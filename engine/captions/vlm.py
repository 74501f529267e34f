"""A video-language captioner: Qwen2.5-VL (through transformers) watches the clip's frames as one video at a chosen
frame rate and answers an instruction aimed at "pure style" captions (motion, camera, effects, no names).

It plugs into the same interface as BLIP-2 (`engine.captions.captioners`): `read_clip` then `caption`, so the
Captions tab, `python -m engine.captions suggest --model ...` and the suggest -> accept/append/ignore flow are the
same for both. Facts borrowed from transformers 5.24 (models/qwen2_vl/video_processing_qwen2_vl.py and
models/qwen2_5_vl/processing_qwen2_5_vl.py): frames are resized to multiples of patch x merge (28 px) within a pixel
budget, grouped in temporal pairs and cut into 14 px patches; the model's time positions follow 2 / fps seconds per
pair (`second_per_grid_ts`).

transformers' own video processors need torchvision, which has no CPU build beside the CPU torch this project pins,
so `ClipVideoProcessor` below does their resize/normalise/patchify in NumPy and OpenCV (same layout, checked against
`Qwen2VLVideoProcessor` where torchvision is importable: bench/caption_speed.py --check-processor). Tokenising, video
token expansion follows `Qwen2_5_VLProcessor` (one video token per merged 2x2 patch group).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.captions.captioners import Blip2Captioner, ClipDecodeError, generate_tokens
from engine.captions.text import CaptionError
from engine.core.hardware import default_device
from engine.core.video import VideoError, probe_video, read_frames

VLM_MODEL_TYPES = ("qwen2_5_vl",)  # config.json model_type values this captioner loads
VLM_HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
MEMORY_MODES = ("auto", "bf16", "8bit", "4bit")  # auto: bf16 on GPU, float32 on CPU; 8/4-bit: bitsandbytes, CUDA
DEFAULT_VIDEO_FPS = 4.0  # frames per second the model watches: 81 frames at 16 fps -> 21 frames, ~5 s of motion
DEFAULT_INSTRUCTION = (
    "Describe this video clip in one sentence for training a motion-style video model. Say what moves and how "
    "(speed, direction, rhythm), the camera movement and any visual effects. Do not name people, characters, "
    "brands or places; describe them by appearance. No preamble."
)


class VideoCaptionerError(CaptionError):
    """A video-language model folder or setting that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ClipVideo:
    """A clip's frames as the model will watch them: `frames` uint8 (T, H, W, 3) RGB sampled at `fps` per second."""

    name: str
    frames: np.ndarray
    fps: float


def read_clip_video(clip: str | Path, fps: float = DEFAULT_VIDEO_FPS) -> ClipVideo:
    """The frames of `clip` on screen at times k / fps (k = 0, 1, ... up to its last frame), as shown
    (engine.core.video: edit lists, pixel aspect and rotation applied, like every other reader of clips).

    Raises ClipDecodeError (a CaptionError) when the clip can't be read or decoded.
    """
    if not fps > 0:
        raise VideoCaptionerError(f"video frame rate must be above 0 frames per second, not {fps}.")
    clip = Path(clip)
    try:
        info = probe_video(clip)
        count = int(np.floor(info.frame_times[-1] * fps + 1e-6)) + 1
        frames = np.stack(list(read_frames(info, info.indices_at(0.0, count, fps))))
    except VideoError as err:
        raise ClipDecodeError(f"{err} Re-cut or re-encode the clip.") from None
    return ClipVideo(clip.name, frames, float(fps))


class ClipVideoProcessor:
    """Qwen2-VL's video preprocessing without torchvision: (T, H, W, 3) uint8 -> patches (grid_t*grid_h*grid_w,
    3 * temporal_patch * patch * patch) float32 and grid (grid_t, grid_h, grid_w), as `Qwen2VLVideoProcessor` lays
    them out. Settings come from the model folder's `video_preprocessor_config.json` (or its image processor's)."""

    def __init__(self, config: dict):
        self.patch_size = int(config.get("patch_size", 14))
        self.temporal_patch_size = int(config.get("temporal_patch_size", 2))
        self.merge_size = int(config.get("merge_size", 2))
        size = config.get("size") or {}
        self.min_pixels = int(config.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28)
        self.max_pixels = int(config.get("max_pixels") or size.get("longest_edge") or 768 * 28 * 28)
        self.mean = np.asarray(config.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
        self.std = np.asarray(config.get("image_std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))

    @classmethod
    def from_folder(cls, folder: Path) -> ClipVideoProcessor:
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (folder / name).is_file():
                return cls(json.loads((folder / name).read_text(encoding="utf-8-sig")))
        return cls({})

    def target_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """(height, width): multiples of patch x merge, aspect kept, pixels per frame within the budget."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        import cv2

        count, height, width, _ = frames.shape
        new_h, new_w = self.target_size(height, width, count)
        video = np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_CUBIC) for f in frames])
        video = (video.astype(np.float32) * self.rescale_factor - self.mean) / self.std  # (T, H, W, C)
        video = video.transpose(0, 3, 1, 2)  # (T, C, H, W)
        if pad := -count % self.temporal_patch_size:  # repeat the last frame to fill the last temporal pair
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_t, grid_h, grid_w = video.shape[0] // tp, new_h // p, new_w // p
        patches = video.reshape(grid_t, tp, 3, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, 3 * tp * p * p), (grid_t, grid_h, grid_w)


def check_vlm_folder(source: str | Path) -> None:
    """Raise VideoCaptionerError unless `source` is a hub id or a Qwen2.5-VL folder with config and weights."""
    from engine.core.models import is_local

    if not is_local(source):
        return
    root = Path(source)
    if not (root / "config.json").is_file():
        raise VideoCaptionerError(f"{root} holds no config.json: give a local copy of {VLM_HUB_ID} (or its 3B "
                                  "sibling) or its hub id.")
    model_type = json.loads((root / "config.json").read_text(encoding="utf-8-sig")).get("model_type")
    if model_type not in VLM_MODEL_TYPES:
        raise VideoCaptionerError(f"{root} holds a {model_type!r} model; the video captioner reads Qwen2.5-VL "
                                  f"({VLM_HUB_ID}).")
    if not any(root.glob("*.safetensors")):
        raise VideoCaptionerError(f"{root} has no .safetensors weights (only safetensors are read).")


def is_vlm_folder(source: str | Path) -> bool:
    """True when `source` is a local folder of a video-language model this module loads."""
    config = Path(source) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8-sig")).get("model_type") in VLM_MODEL_TYPES
    except (OSError, ValueError):
        return False


class VideoLanguageCaptioner:
    """Qwen2.5-VL loaded on first use and kept until `unload()`; one clip per forward pass.

    `memory_mode`: 'auto' (bf16 on a GPU, float32 on a CPU), 'bf16', '8bit' or '4bit' (bitsandbytes, CUDA only).
    `instruction`: what the model is asked; `video_fps`: frames per second of the clip it watches.
    """

    reads_video = True
    batch_size = 1  # clips per forward pass

    def __init__(self, source: str | Path, device: str | None = None, *, memory_mode: str = "auto",
                 instruction: str = DEFAULT_INSTRUCTION, video_fps: float = DEFAULT_VIDEO_FPS,
                 max_new_tokens: int = 77, min_new_tokens: int = 1):
        if memory_mode not in MEMORY_MODES:
            raise VideoCaptionerError(f"memory mode {memory_mode!r}: use one of {', '.join(MEMORY_MODES)}.")
        if not instruction.strip():
            raise VideoCaptionerError("The caption instruction is empty: say what the model should describe.")
        if not 0 < video_fps <= 16:
            raise VideoCaptionerError(f"video frame rate must be in (0, 16] frames per second, not {video_fps}.")
        self.source = str(source)
        self.name = Path(self.source).name or self.source
        self.device = str(device or default_device())  # "cuda", "cuda:1" or "cpu"
        if memory_mode in ("8bit", "4bit") and not self.device.startswith("cuda"):
            raise VideoCaptionerError(f"memory mode {memory_mode} needs a CUDA GPU (bitsandbytes); on "
                                      f"{self.device} use 'auto'.")
        self.memory_mode, self.instruction, self.video_fps = memory_mode, instruction, float(video_fps)
        self.max_new_tokens = max_new_tokens  # caption length limit, in model tokens
        self.min_new_tokens = min_new_tokens  # never an empty suggestion
        self._tokenizer = self._video = self._model = None
        self._template = ""

    @classmethod
    def from_loaded(cls, tokenizer, model, chat_template: str, video_processor: ClipVideoProcessor, name: str,
                    **kwargs) -> VideoLanguageCaptioner:
        """Wrap parts built in memory (benchmarks with random weights); `name` is what a reload would read."""
        captioner = cls(name, device=str(model.device), **kwargs)
        captioner._tokenizer, captioner._template, captioner._video, captioner._model = (
            tokenizer, chat_template, video_processor, model)
        return captioner

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load processor parts and model (safetensors only). Raises VideoCaptionerError for a wrong folder."""
        if self._model is not None:
            return
        import torch
        from transformers import AutoTokenizer, BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

        check_vlm_folder(self.source)
        kwargs: dict = {"use_safetensors": True}
        if self.memory_mode in ("8bit", "4bit"):
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.memory_mode == "8bit", load_in_4bit=self.memory_mode == "4bit",
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": self.device}
        else:
            kwargs["dtype"] = torch.float32 if self.device == "cpu" and self.memory_mode == "auto" else torch.bfloat16
        tokenizer = AutoTokenizer.from_pretrained(self.source)
        folder = Path(self.source) if Path(self.source).is_dir() else Path(_snapshot(self.source))
        self._template = _chat_template(folder, tokenizer)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.source, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(self.device)
        self._tokenizer, self._video, self._model = tokenizer, ClipVideoProcessor.from_folder(folder), model.eval()

    def unload(self) -> None:
        import gc

        import torch

        self._tokenizer = self._video = self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def read_clip(self, clip: str | Path) -> ClipVideo:
        return read_clip_video(clip, self.video_fps)

    def model_inputs(self, video: ClipVideo) -> dict:
        """The model's inputs for one clip: input_ids, attention_mask, mm_token_type_ids, pixel_values_videos,
        video_grid_thw, second_per_grid_ts (tensors on the model's device)."""
        import torch

        self.load()
        patches, grid = self._video(video.frames)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": self.instruction}]}]
        text = self._tokenizer.apply_chat_template(messages, chat_template=self._template, add_generation_prompt=True,
                                                   tokenize=False)
        # One video token per merged patch group, as the library's processor expands it; modality id 2 marks them.
        video_token_id = self._model.config.video_token_id
        video_token = self._tokenizer.convert_ids_to_tokens(video_token_id)
        text = text.replace(video_token, video_token * (int(np.prod(grid)) // self._video.merge_size ** 2))
        inputs = self._tokenizer([text], return_tensors="pt", add_special_tokens=False)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == video_token_id).to(torch.int32) * 2
        inputs["pixel_values_videos"] = torch.from_numpy(patches).to(self._model.dtype)
        inputs["video_grid_thw"] = torch.tensor([grid])
        inputs["second_per_grid_ts"] = torch.tensor([self._video.temporal_patch_size / video.fps])
        return {k: v.to(self._model.device) for k, v in inputs.items()}

    def caption(self, videos: Sequence[ClipVideo]) -> list[str]:
        """One caption per clip. Raises CaptionerOutOfMemory with the settings that lower memory."""
        captions = []
        for video in videos:
            inputs = self.model_inputs(video)
            output = generate_tokens(
                self._model, inputs, self.max_new_tokens, self.min_new_tokens,
                f"The GPU ran out of memory captioning {video.name} ({len(video.frames)} frames) with {self.name}. "
                f"Lower the video frame rate (now {self.video_fps:g}), use memory mode 8bit or 4bit, or stop other "
                "GPU jobs.")
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            captions.append(self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip())
        return captions


def _snapshot(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_id, allow_patterns=["*.json", "*.jinja"])


def _chat_template(folder: Path, tokenizer) -> str:
    """The chat template shipped with the model (chat_template.jinja, chat_template.json or the tokenizer's)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8-sig")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8-sig"))["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise VideoCaptionerError(f"{folder} has no chat template (chat_template.jinja or chat_template.json).")


def open_captioner(source: str | Path, device: str | None = None, *, video: dict | None = None,
                   blip2: dict | None = None):
    """The captioner for `source`: a VideoLanguageCaptioner for a Qwen2.5-VL folder or hub id (`video`: its keyword
    settings), else a Blip2Captioner (`blip2`: its keyword settings). Nothing is loaded until first use."""
    local = Path(source).is_dir()
    if (local and is_vlm_folder(source)) or (not local and "-vl" in str(source).lower()):
        return VideoLanguageCaptioner(source, device, **(video or {}))
    return Blip2Captioner(source, device=device, **(blip2 or {}))
