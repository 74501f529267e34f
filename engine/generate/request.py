"""What to generate: the request, its checks, output sizes and the start image."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from engine.core.families import Wan22I2V

# Wan's usual negative prompt (the one its authors ship as the default: Wan2.1 wan/configs/shared_config.py
# sample_neg_prompt), in the original Chinese.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
# What it says, for people without Chinese (or without CJK fonts, where it shows as boxes): our translation.
WAN_NEGATIVE_PROMPT_GLOSS = (
    "garish colours, overexposed, static, blurry details, subtitles, style, artwork, painting, frame, still, greyish "
    "overall, worst quality, low quality, JPEG artefacts, ugly, mutilated, extra fingers, badly drawn hands, badly "
    "drawn faces, deformed, disfigured, malformed limbs, fused fingers, motionless frame, cluttered background, three "
    "legs, crowded background, walking backwards"
)


PIXEL_BUDGET_480P = 832 * 480


SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2


STRENGTH_MIN, STRENGTH_MAX = -1.0, 2.0
STRENGTH_RULE = (f"a LoRA strength is a number from {STRENGTH_MIN:g} to {STRENGTH_MAX:g} (0 = off, 1 = as trained, "
                 "below 0 pushes away from the style)")


def check_strength(strength: float, what: str) -> float:
    """`strength` as a float if it keeps STRENGTH_RULE; else GenerationError naming `what` (e.g. "Strength 1")."""
    value = float(strength)
    if not STRENGTH_MIN <= value <= STRENGTH_MAX:
        raise GenerationError(f"{what} is {value:g}, but {STRENGTH_RULE}.")
    return value


LORA_EXPERTS = tuple(e.name for e in Wan22I2V.experts)  # where a Wan 2.2 LoRA goes: 'high_noise', 'low_noise'


# Samplers by the names people use -> diffusers scheduler classes (all flow-matching, as Wan is trained). "lcm"
# predicts the clean video at each step and re-noises it: what step-distillation LoRAs (lightx2v, CausVid) are
# trained for, as ComfyUI's "lcm" sampler.
SCHEDULERS = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler",
              "lcm": "FlowMatchLCMScheduler"}


MAX_IMAGE_SIDE = 4096  # bigger inputs are scaled down first: the model sees about 832x480 anyway






class GenerationError(ValueError):
    """A request that cannot be rendered as given: which parameter or file, and what to do."""


class GenerationCancelled(RuntimeError):
    """The person pressed stop; nothing was written."""


# ---------------------------------------------------------------------------------------------- the request

@dataclass
class GenerationRequest:
    """Everything that decides a video. `seed`, `height`, `width` left as None are chosen and recorded."""

    image: str
    prompt: str
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    seed: int | None = None  # None or negative: a random seed, written to the sidecar
    steps: int = 30  # denoising steps, 1-200
    guidance: float = 5.0  # classifier-free guidance scale; <= 1 turns guidance off (one pass per step)
    frames: int = 81  # 4k+1 (81 = 5.06 s at 16 fps); other counts are adjusted
    height: int | None = None  # None: from the image's aspect at `pixel_budget`, multiples of 16
    width: int | None = None
    pixel_budget: int = PIXEL_BUDGET_480P  # width x height aimed at when the size comes from the image
    fps: float = 16.0  # Wan's native rate
    # (file, strength -1..2[, expert]), stacked. Wan 2.2: expert 'high_noise' or 'low_noise' says which transformer
    # the LoRA goes into (a pair is two entries, each at its own strength); none = the first transformer.
    loras: list[tuple] = field(default_factory=list)
    scheduler: str = "unipc"  # one of SCHEDULERS: the model's own UniPC, flow-match Euler, or flow-match LCM
    flow_shift: float | None = None  # sigma shift s*t / (1 + (s-1)*t), 1-20; None: the model folder's (3 at 480p)
    decode_bf16: bool = False  # VAE decode under bf16 autocast (GPU only): faster, frames differ slightly (drafts)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = [(str(entry[0]), float(entry[1]), *entry[2:3]) for entry in values.get("loras", [])]
        return cls(**values)


def lora_expert(path: str | Path) -> str | None:
    """The Wan 2.2 expert a LoRA file was trained for, from the metadata our trainer writes ('expert'), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            expert = (handle.metadata() or {}).get("expert")
    except (OSError, ValueError, RuntimeError):
        return None
    return expert if expert in LORA_EXPERTS else None


def expand_lora_choice(path: str | Path, strength: float, low_noise_strength: float,
                       two_experts: bool) -> list[tuple]:
    """The request entries of one LoRA choice at its strengths (high-noise `strength`, low-noise
    `low_noise_strength`): a Wan 2.2 run's epoch folder gives its expert files, each at its expert's strength; a
    file trained for one expert goes to that expert; any other file (or a Wan 2.1 run's epoch folder) goes to both
    experts of a Wan 2.2 model (each at its strength) and, on Wan 2.1, to the transformer at `strength`."""
    path = Path(path)
    strengths = {"high_noise": float(strength), "low_noise": float(low_noise_strength)}
    if path.is_dir():
        files = [(path / Wan22I2V.lora_file_name(e), e.name) for e in Wan22I2V.experts]
        found = [(str(f), strengths[name], name) for f, name in files if f.is_file()]
        if found:
            return found
    expert = lora_expert(path) if path.is_file() else None
    if expert:
        return [(str(path), strengths[expert], expert)]
    if two_experts:
        return [(str(path), strengths[name], name) for name in LORA_EXPERTS]
    return [(str(path), float(strength))]


def lora_rows_of(loras: list[tuple]) -> list[tuple[str, float, float]]:
    """Request entries back as the choices `expand_lora_choice` made them from: (file or pair folder, high-noise (or
    only) strength, low-noise strength)."""
    pair_names = {Wan22I2V.lora_file_name(e): e.name for e in Wan22I2V.experts}
    rows: list[tuple[str, float, float]] = []
    for path, strength, *expert in loras:
        strength = float(strength)
        if not expert:
            rows.append((str(path), strength, 1.0))
            continue
        source = str(Path(path).parent) if pair_names.get(Path(path).name) == expert[0] else str(path)
        if rows and rows[-1][0] == source and expert[0] == "low_noise":  # the pair's (or shared file's) second half
            rows[-1] = (source, rows[-1][1], strength)
        elif expert[0] == "low_noise":
            rows.append((source, 1.0, strength))
        else:
            rows.append((source, strength, 1.0))
    return rows


def _multiple_of_16(value: float) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def fit_size(image_width: int, image_height: int, pixel_budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """(height, width) with the image's aspect and about `pixel_budget` pixels, both multiples of 16."""
    scale = math.sqrt(pixel_budget / (image_width * image_height))
    return _multiple_of_16(image_height * scale), _multiple_of_16(image_width * scale)


def output_size(image_size: tuple[int, int], height: int | None = None, width: int | None = None,
                pixel_budget: int = PIXEL_BUDGET_480P) -> tuple[int, int]:
    """(height, width) to render, multiples of 16. A side left empty (None or 0) follows the image's aspect from
    the side given, so giving only a width never crops a landscape image to a portrait; none given: `fit_size`."""
    image_width, image_height = image_size
    if not height and not width:
        return fit_size(image_width, image_height, pixel_budget)
    width = _multiple_of_16(width or height * image_width / image_height)
    height = _multiple_of_16(height or width * image_height / image_width)
    return height, width


def nearest_valid_frames(frames: int) -> int:
    """The nearest 4k+1 frame count (at least 5): the VAE packs 4 frames per latent after the first."""
    return max(5, 4 * round((frames - 1) / 4) + 1)


def open_image(path: str | Path):
    """Open an image as RGB with its EXIF rotation applied; transparency is flattened onto white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"Image not found: {path}.")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.width * img.height > MAX_IMAGE_SIDE * MAX_IMAGE_SIDE:
                img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # shrink before the mode conversion: less memory
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")  # 16-bit greyscale down to 8 bits
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise GenerationError(f"{path.name} is too large to open safely ({err}). Scale it down first.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise GenerationError(f"{path.name} is not a readable image ({err}). Use a PNG, JPEG or WebP file.") from err


def prepare_image(image, height: int, width: int):
    """Scale the image to cover height x width and crop the centre, so nothing is stretched."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def lora_file(path: str | Path) -> Path:
    """The LoRA file a request names (an epoch folder stands for its adapter file), as a GenerationError if none."""
    from engine.generate.lora_files import LoraFileError, resolve_lora_file

    try:
        return resolve_lora_file(path)
    except LoraFileError as err:
        raise GenerationError(str(err)) from err


def resolve_request(request: GenerationRequest, image_size: tuple[int, int]) -> tuple[GenerationRequest, list[str]]:
    """Check every parameter; return the request with seed, size and frames made concrete, and notes on changes."""
    notes: list[str] = []
    if request.prompt is None:
        raise GenerationError("prompt is missing: describe the motion you want (it may be empty text).")
    if not 1 <= int(request.steps) <= 200:
        raise GenerationError(f"steps must be between 1 and 200, not {request.steps}.")
    if not 0 <= float(request.guidance) <= 30:
        raise GenerationError(f"guidance must be between 0 and 30 (5 is usual), not {request.guidance}.")
    if request.scheduler not in SCHEDULERS:
        raise GenerationError(f"scheduler {request.scheduler!r} is not one of {', '.join(SCHEDULERS)}.")
    if request.flow_shift is not None and not 1 <= float(request.flow_shift) <= 20:
        raise GenerationError(f"flow shift must be between 1 and 20 (3 is Wan 480p's, 5 is usual for 4-step "
                              f"LoRAs), not {request.flow_shift}.")
    if not float(request.fps) > 0:
        raise GenerationError(f"fps must be positive, not {request.fps}.")
    frames = int(request.frames)
    if frames < 1:
        raise GenerationError(f"frames must be at least 1, not {frames}.")
    if (frames - 1) % 4 or frames < 5:
        adjusted = nearest_valid_frames(frames)
        notes.append(f"frames {frames} is not 4k+1 (the VAE packs 4 frames per latent); using {adjusted}.")
        frames = adjusted
    loras = []
    for path, strength, *expert in request.loras:
        if expert and expert[0] not in LORA_EXPERTS:
            raise GenerationError(f"LoRA {Path(path).name}: expert {expert[0]!r} is not one of "
                                  f"{', '.join(LORA_EXPERTS)}.")
        strength = check_strength(strength, f"The strength of {Path(path).name}")
        loras.append((str(lora_file(path).resolve()), strength, *expert))
    for name, value in (("height", request.height), ("width", request.width)):
        if value and int(value) < SIZE_MULTIPLE:
            raise GenerationError(f"{name} must be at least {SIZE_MULTIPLE} pixels (or 0: from the image), "
                                  f"not {value}.")
    height, width = output_size(image_size, request.height, request.width, request.pixel_budget)
    uneven = [f"{name} {value}" for name, value, used in (("width", request.width, width),
                                                          ("height", request.height, height))
              if value and int(value) != used]
    if uneven:
        notes.append(f"{', '.join(uneven)}: not a multiple of 16; using {width}x{height}.")
    seed = request.seed
    if seed is None or int(seed) < 0:
        seed = secrets.randbelow(2**31)
    return replace(request, image=str(Path(request.image).resolve()), seed=int(seed), frames=frames,
                   height=int(height), width=int(width), steps=int(request.steps), loras=loras), notes


# The scheduler Wan2.1-I2V-14B-480P-Diffusers ships (UniPC, flow shift 3, variant bh2): for sidecars that predate
# the scheduler record.
WAN_480P_SCHEDULER = {"class": "UniPCMultistepScheduler", "flow_shift": 3.0, "solver_type": "bh2"}
