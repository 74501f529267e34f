"""Draft mode: renders and sweeps through an accelerator (step-distillation) LoRA the person has, at its few-step
settings, to preview motion in seconds; a chosen draft is then rendered again in full quality.

A draft's sidecar records the accelerator LoRA and the full-quality settings it stood in for, so `full_request`
gives back the same image, prompt, seed, size and the person's own LoRAs at the same strengths, without the
accelerator and with the full steps, guidance and sampler. A draft previews motion, not final quality: the
accelerator changes detail and colour as well as speed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from engine.generate.request import GenerationError, GenerationRequest, lora_file


@dataclass(frozen=True)
class DraftSettings:
    """How drafts are rendered. The defaults are what the published 4-step Wan 2.1 I2V LoRAs (lightx2v's
    step-distillation LoRAs, their model cards and ComfyUI workflows) are run with."""

    lora: str  # the accelerator LoRA file (.safetensors) the person has; nothing is downloaded
    strength: float = 1.0  # the accelerator's own strength (1 as distilled)
    steps: int = 4  # the step count the LoRA was distilled for
    guidance: float = 1.0  # guidance off: one transformer pass per step (the guidance is distilled in)
    scheduler: str = "lcm"  # flow-match LCM: predict the clean video, re-noise at the next level
    flow_shift: float = 5.0  # sigma shift for 4 steps at 480p
    decode_bf16: bool = True  # a preview: the VAE decodes under bf16 autocast on a GPU


def draft_of(request: GenerationRequest, draft: DraftSettings) -> GenerationRequest:
    """`request` as a draft: the accelerator stacked after the person's LoRAs, with its steps, guidance, sampler."""
    return replace(request, steps=draft.steps, guidance=draft.guidance, scheduler=draft.scheduler,
                   flow_shift=draft.flow_shift, decode_bf16=draft.decode_bf16,
                   loras=[*request.loras, (draft.lora, draft.strength)])


def draft_record(request: GenerationRequest, draft: DraftSettings) -> dict:
    """The sidecar's `draft` entry: which LoRA is the accelerator, and the full-quality settings to return to."""
    return {"lora": str(lora_file(draft.lora).resolve()), "strength": draft.strength,
            "full": {"steps": request.steps, "guidance": request.guidance, "scheduler": request.scheduler,
                     "flow_shift": request.flow_shift, "decode_bf16": request.decode_bf16}}


def full_request(sidecar: dict) -> GenerationRequest:
    """The full-quality request of a draft, from the draft's sidecar: same seed and LoRA strengths, no accelerator.
    Raises GenerationError for a video that is not a draft."""
    if "draft" not in sidecar:
        raise GenerationError(f"{sidecar.get('video', 'This video')} is not a draft: it is full quality already.")
    request = GenerationRequest.from_dict(sidecar["request"])
    record = sidecar["draft"]
    own = [(path, strength) for path, strength in request.loras if Path(path).resolve() != Path(record["lora"])]
    return replace(request, loras=own, **record["full"])
