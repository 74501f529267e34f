"""`python -m engine.generate`: one video, a strength sweep, or a reproduction from a sidecar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.core.families import family_of
from engine.core.motion import MOTION_UNIT_SHORT
from engine.generate.comfyui import export_comfyui_workflow
from engine.generate.draft import DraftSettings, full_request
from engine.generate.pipeline import PipelineCache, PipelineOptions, memory_advice
from engine.generate.render import (
    new_output_path,
    options_from_sidecar,
    read_sidecar,
    render_video,
    reproduce,
)
from engine.generate.request import (
    SCHEDULERS,
    WAN_NEGATIVE_PROMPT,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    expand_lora_choice,
)
from engine.generate.sweep import render_sweep

# ---------------------------------------------------------------------------------------------- command line

def _parse_strengths(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--strengths takes numbers separated by commas, not {text!r}") from err


def _reproduce_cli(sidecar: Path, out_dir: Path | None) -> int:
    try:
        data = read_sidecar(sidecar)
        out_path = new_output_path(out_dir, Path(data["video"]).stem + "-again") if out_dir else None
        path, identical = reproduce(sidecar, PipelineCache(), out_path,
                                    on_progress=lambda f, m: print(f"[{f * 100:5.1f}%] {m}", file=sys.stderr))
    except (GenerationError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}\t{'identical frames' if identical else 'frames differ (another device or library version?)'}")
    return 0


def _render_in_full_cli(sidecar: Path, out_dir: Path | None) -> int:
    try:
        data = read_sidecar(sidecar)
        request = full_request(data)
        options = options_from_sidecar(sidecar)
        pipe = PipelineCache().get(options)
        path = render_video(pipe, request, new_output_path(out_dir or Path(sidecar).parent, "full"),
                            model=options.model, extra={"full_of": data["video"]},
                            on_progress=lambda f, m: print(f"[{f * 100:5.1f}%] {m}", file=sys.stderr))
    except (GenerationError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


CLI_SETTING_NAMES = {"cpu_offload": "--cpu-offload", "vae_tiling": "--vae-tiling", "frames": "--frames",
                     "size": "--height/--width"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Wan 2.1 I2V diffusers folder or hub id")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--prompt")
    parser.add_argument("--reproduce", type=Path, metavar="SIDECAR",
                        help="render a video again from its .json sidecar (nothing else needed)")
    parser.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT)
    parser.add_argument("--lora", action="append", default=[], type=Path, help="LoRA file (repeat to stack)")
    parser.add_argument("--strength", action="append", default=[], type=float,
                        help="strength of the matching --lora, -1..2 (default 1)")
    parser.add_argument("--low-noise-strength", action="append", default=[], type=float,
                        help="Wan 2.2: the low-noise expert's strength of the matching --lora (default: its "
                             "--strength); a Wan 2.2 run's epochN folder as --lora is its pair of expert files")
    parser.add_argument("--strengths", type=_parse_strengths,
                        help="sweep the first LoRA over these strengths, e.g. 0,0.5,1,1.5")
    parser.add_argument("--epochs", nargs="+", type=Path, default=None,
                        help="sweep over these LoRA files (e.g. runs/r/epoch*/adapter_model.safetensors)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default="unipc",
                        help="sampler: unipc (the model's own), euler or lcm (flow-match; for step-distilled LoRAs)")
    parser.add_argument("--flow-shift", type=float, default=None, help="sigma shift (default: the model folder's)")
    parser.add_argument("--draft", type=Path, metavar="ACCELERATOR_LORA",
                        help="render drafts through this step-distillation LoRA: 4 LCM steps, no guidance, shift 5 "
                             "(previews motion, not final quality)")
    parser.add_argument("--render-in-full", type=Path, metavar="SIDECAR",
                        help="render a draft again at full quality (same seed and LoRA strengths)")
    parser.add_argument("--seed", type=int, default=None, help="default: random (written to the sidecar)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--cpu-offload", action="store_true", help="model CPU offload (for 24 GB cards)")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--fast", action="store_true", help="speed-ups from engine/accel.py")
    parser.add_argument("--device", default=None)
    parser.add_argument("--comfyui", action="store_true", help="also write each video's ComfyUI workflow")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.reproduce:
        return _reproduce_cli(args.reproduce, args.out)
    if args.render_in_full:
        return _render_in_full_cli(args.render_in_full, args.out)
    missing = [f"--{name}" for name in ("model", "image", "prompt", "out") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if len(args.strength) > len(args.lora):
        parser.error("more --strength values than --lora files")
    two_experts = len(family_of(args.model).experts) > 1
    loras = []
    for i, file in enumerate(args.lora):
        strength = args.strength[i] if i < len(args.strength) else 1.0
        low = args.low_noise_strength[i] if i < len(args.low_noise_strength) else strength
        loras += expand_lora_choice(file, strength, low, two_experts)
    request = GenerationRequest(
        image=str(args.image), prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps, guidance=args.guidance, frames=args.frames, height=args.height, width=args.width,
        fps=args.fps, loras=loras, scheduler=args.scheduler, flow_shift=args.flow_shift)
    draft = DraftSettings(lora=str(args.draft)) if args.draft else None
    options = PipelineOptions(model=args.model, device=args.device, cpu_offload=args.cpu_offload,
                              vae_tiling=args.vae_tiling, fast=args.fast)

    def report(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    from engine.core.models import ModelFolderError
    from engine.generate.lora_files import LoraFileError, LoraMismatchError

    cache = PipelineCache()
    try:
        pipe = cache.get(options, on_progress=report)
        if args.strengths or args.epochs:
            result = render_sweep(pipe, request, args.out, strengths=args.strengths, lora_files=args.epochs,
                                  model=args.model, draft=draft, on_progress=report)
            videos = result.videos
            for label, video, motion in zip(result.labels, result.videos, result.motion):
                print(f"{video}\t{label}\tmotion {motion:.3f} {MOTION_UNIT_SHORT}")
            print(result.comparison)
        else:
            videos = [render_video(pipe, request, new_output_path(args.out, "draft" if draft else "gen"),
                                   on_progress=report, model=args.model, draft=draft)]
            print(videos[0])
        if args.comfyui:
            for video in videos:
                print(export_comfyui_workflow(video))
    except (GenerationError, LoraFileError, LoraMismatchError, ModelFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (GenerationCancelled, KeyboardInterrupt):
        print("stopped", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if "out of memory" not in str(err).lower():
            raise
        print(f"error: {memory_advice(options, CLI_SETTING_NAMES)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
