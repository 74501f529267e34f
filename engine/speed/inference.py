"""The fast inference path: float8 matmuls, compiled blocks and cuDNN attention applied to a pipeline."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from engine.speed.blocks import _runners, compile_blocks
from engine.speed.float8 import Float8Report, apply_float8_compute, float8_compute_support

# ---------------------------------------------------------------------------------------------- inference

@dataclasses.dataclass
class FastInferenceReport:
    """What `apply_fast_inference` changed, in words the UI can show."""

    float8: Float8Report | None
    compiled: bool
    notes: list[str]


def apply_fast_inference(transformer: nn.Module, *, float8: bool = True, compile: bool = True,
                         compile_backend: str = "inductor") -> FastInferenceReport:
    """The generation path's speed-ups: float8 matmuls for the frozen block Linears (only where the card has them;
    elsewhere nothing changes, since float8 storage alone would slow inference) and compiled blocks (GPU only,
    unless a backend is named), with LoRA strengths read from tensors so strength changes never recompile.

    Call before loading LoRAs (they sit beside the float8 base layers in bf16) and never fuse LoRAs afterwards.
    """
    device = next(p.device for p in transformer.parameters())
    notes: list[str] = []
    report = None
    # Loaded with from_pretrained every weight still requires grad; float8 packs only frozen Linears, and nothing
    # trains here (LoRAs loaded later by diffusers are frozen by peft anyway).
    transformer.requires_grad_(False)
    if float8:
        supported, why = float8_compute_support(device)
        if supported:
            report = apply_float8_compute(transformer)
            notes.append(f"float8 matmuls on {report.converted} block linears")
        else:
            notes.append(f"float8 off: {why}")
    compiled = compile and (device.type == "cuda" or compile_backend != "inductor")
    if compiled:
        compile_blocks(transformer, backend=compile_backend)
        for runner in _runners(transformer):
            runner.inference_lora = True
        notes.append("blocks compiled (the first generation at a new size compiles them: slower)")
    return FastInferenceReport(report, compiled, notes)


def prepare_pipeline_for_inference(pipe, device: torch.device | str | None = None, **options) -> FastInferenceReport:
    """`apply_fast_inference` on a WanImageToVideoPipeline's transformers (Wan 2.2: both experts), on the GPU they
    will run on; returns the first one's report with every transformer's notes.

    A transformer still on the CPU is moved to `device` first (default: the GPU when there is one), because float8
    packing and the float8 check need the card. Options are passed on (float8=, compile=).
    """
    reports = []
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        current = next(p.device for p in transformer.parameters())
        target = torch.device(device) if device is not None else (
            torch.device("cuda") if current.type == "cpu" and torch.cuda.is_available() else current)
        if target != current:
            transformer.to(target)
        reports.append((name, apply_fast_inference(transformer, **options)))
    report = reports[0][1]
    if len(reports) > 1:
        report = dataclasses.replace(report, notes=[f"{name}: {note}" for name, r in reports for note in r.notes])
    pipe.__dict__["_accel_report"] = report
    return report
