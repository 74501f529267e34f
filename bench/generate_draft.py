"""Draft mode and the full-quality guided step at 480x832x81 on the Wan 2.1 I2V 14B architecture, in one run.

    python bench/generate_draft.py            # one H100/H200: everything below, one table
    python bench/generate_draft.py --tiny     # the same code on the tiny kit, on the CPU

The pipeline is bench/generate_step.py's (14B transformer with random bf16 weights, the real-size Wan VAE and CLIP
image encoder, a 2-layer UMT5 of the real width). The person's LoRA: rank 32 on every block Linear (as the trainer
saves it). The accelerator: a random LoRA in the published step-distillation layout (rank 64 lora_down/lora_up on
every block Linear, the head and the time/text embedders, .diff_b on each of them, .diff on the q/k norms and the
cross-attention norm), applied by engine.generate exactly as a real one.

Measured, in this order, on one card:
1. plain diffusers, guided step (no LoRA), and our bf16 path with the LoRA (the quality reference);
2. the fast path (engine.speed: float8 matmuls, compiled blocks, cuDNN attention) with the LoRA at 1: guided step,
   velocity error and final-frame PSNR against bf16;
3. a Draft video through engine.generate.render_video (accelerator + LoRA, 4 LCM steps, guidance off, VAE decode
   and mp4 included; the decode alone stated) and a Draft sweep of 4 strengths (render_sweep, comparison included).
Reserved memory is printed beside allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate_e2e import write_with_opencv  # noqa: E402
from generate_step import (  # noqa: E402
    GIB,
    LORA_RANK,
    StepClock,
    build_pipeline,
    psnr,
    run_generate,
    run_plain,
    velocity,
    velocity_inputs,
    write_lora,
)

ACCELERATOR_RANK = 64


def write_accelerator(transformer, path: Path, rank: int) -> Path:
    """A random LoRA in the layout of published step-distillation LoRAs (original Wan names, lora_down/lora_up,
    .diff_b, norm .diff), saved as those files are."""
    from safetensors.torch import save_file

    from engine.generate.lora_files import to_original_module

    gen = torch.Generator().manual_seed(11)
    state = {}
    for name, module in transformer.named_modules():
        try:
            original = "diffusion_model." + to_original_module(name)
        except KeyError:
            continue
        if isinstance(module, torch.nn.Linear):
            state[f"{original}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) / \
                module.in_features**0.5
            state[f"{original}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01 / \
                rank**0.5
            state[f"{original}.alpha"] = torch.tensor(float(rank))
            state[f"{original}.diff_b"] = torch.randn(module.out_features, generator=gen) * 0.001
        elif getattr(module, "weight", None) is not None and module.weight.ndim == 1:  # the norms
            state[f"{original}.diff"] = torch.randn(module.weight.shape, generator=gen) * 0.001
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    return path


def combine_with_opencv(clips, labels, out_path, fps: float = 16.0, columns: int = 4) -> Path:
    """The sweep's comparison as unlabelled tiles in one row per `columns`, for machines without ffmpeg/moviepy."""
    frames = max(len(c) for c in clips)
    held = [np.concatenate([c, np.repeat(c[-1:], frames - len(c), axis=0)]) for c in clips]
    rows = [np.concatenate(held[i:i + columns], axis=2) for i in range(0, len(held), columns)]
    width = max(r.shape[2] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, 0), (0, width - r.shape[2]), (0, 0))) for r in rows]
    return write_with_opencv(np.concatenate(rows, axis=1), out_path, fps)


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def timed_draft(pipe, request, draft, out: Path) -> dict:
    """One Draft video through render_video (what the Generate tab runs), timed to the written mp4 + sidecar."""
    from engine.generate.render import read_sidecar, render_video

    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    render_video(pipe, request, out, on_progress=clock, draft=draft)
    total = time.perf_counter() - started
    sidecar = read_sidecar(out)
    steps = clock.step_seconds()
    return {"total_s": total, "generate_s": sidecar["seconds"], "steps": steps,
            "decode_s": sidecar["seconds"] - (clock.decode_started() - clock.marks[0][1]), **memory()}


def full_quality(pipe, request, results: dict, tiny: bool) -> None:
    """Parts 1 and 2: plain diffusers, our bf16 path (the quality reference), then the fast path with the LoRA."""
    from dataclasses import replace

    from engine.speed.inference import prepare_pipeline_for_inference

    run_plain(pipe, request, results)
    results["plain diffusers (no LoRA)"].update(memory())
    frames_bf16 = run_generate(pipe, request, "ours bf16 + LoRA 1.0", results)
    results["ours bf16 + LoRA 1.0"].update(memory())
    inputs = velocity_inputs(pipe, request.frames, request.height, request.width, pipe._execution_device.type, tiny)
    v_ref = [velocity(pipe, x) for x in inputs]
    # the fast path, applied before any LoRA is loaded (as PipelineCache(fast=True) does)
    pipe.unload_lora_weights()
    for key in ("_studio_adapters", "_studio_adapter_info", "_studio_diffs"):
        pipe.__dict__.pop(key, None)
    results["fast_notes"] = prepare_pipeline_for_inference(pipe).notes
    t0 = time.perf_counter()
    run_generate(pipe, replace(request, steps=2), "fast warm-up (compiles)", results)
    results["fast_warmup_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    frames_fast = run_generate(pipe, request, "ours fast + LoRA 1.0", results)
    results["ours fast + LoRA 1.0"].update(memory())
    v_fast = [velocity(pipe, x) for x in inputs]
    results["velocity_relative_error"] = [float((f - r).norm() / r.norm()) for f, r in zip(v_fast, v_ref)]
    results["frames_psnr_db"] = psnr(frames_fast, frames_bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="guided steps per timed full-quality generation")
    parser.add_argument("--draft-only", action="store_true", help="only part 3 (the Draft video and sweep)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    args = parser.parse_args(argv)

    from dataclasses import replace

    from engine.generate.draft import DraftSettings
    from engine.generate.request import GenerationRequest
    from engine.generate.sweep import render_sweep
    from engine.speed.inference import prepare_pipeline_for_inference

    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:  # the GPU machines have no ffmpeg: the mp4s are written by OpenCV there (said in the table)
        import engine.generate.render
        import engine.generate.sweep

        engine.generate.render.write_video = write_with_opencv
        engine.generate.sweep.combine_side_by_side = combine_with_opencv
        results_note = "mp4s and the comparison (unlabelled tiles) written by OpenCV (no ffmpeg on this machine)"
    else:
        results_note = "mp4s written by ffmpeg"
    device = "cpu" if args.tiny else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="draftbench-"))
    frames, height, width = (9, 32, 32) if args.tiny else (81, 480, 832)
    results: dict = {"config": {"frames": frames, "height": height, "width": width, "steps": args.steps,
                                "lora_rank": LORA_RANK, "accelerator_rank": ACCELERATOR_RANK,
                                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                "writer": results_note}}
    started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, work / "kits").to(device)
    print(f"pipeline built in {time.perf_counter() - started:.1f} s", flush=True)
    lora = write_lora(pipe.transformer, work / "lora", 4 if args.tiny else LORA_RANK)
    accelerator = write_accelerator(pipe.transformer, work / "accelerator.safetensors",
                                    4 if args.tiny else ACCELERATOR_RANK)
    from PIL import Image

    image_path = work / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image_path)
    request = GenerationRequest(image=str(image_path), prompt="a warrior runs across a field", seed=0,
                                steps=args.steps, guidance=5.0, frames=frames, height=height, width=width,
                                loras=[(str(lora), 1.0)])

    if not args.draft_only:
        full_quality(pipe, request, results, args.tiny)
    else:
        results["fast_notes"] = prepare_pipeline_for_inference(pipe).notes

    # 3. Draft: warm-ups at 1 step (the new adapters' layers compile), one video, a sweep of 4 strengths
    draft = DraftSettings(lora=str(accelerator))
    t0 = time.perf_counter()
    for strength in (1.0, 0.0):  # both adapter sets the sweep uses (a LoRA at 0 is left out: another graph)
        timed_draft(pipe, replace(request, loras=[(str(lora), strength)]), replace(draft, steps=1),
                    work / f"warm-{strength}.mp4")
    results["draft_warmup_s"] = time.perf_counter() - t0
    results["draft video"] = timed_draft(pipe, request, draft, work / "draft.mp4")
    print(f"draft: {json.dumps(results['draft video'])}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sweep = render_sweep(pipe, request, work / "sweep", strengths=[0.0, 0.5, 1.0, 1.5], draft=draft)
    results["draft sweep"] = {"total_s": time.perf_counter() - t0, "variants": len(sweep.videos), **memory()}
    print(f"sweep: {json.dumps(results['draft sweep'])}", flush=True)
    (args.out / "generate_draft.json").write_text(json.dumps(results, indent=1))

    print("\n| what | seconds | x plain | peak allocated / reserved GiB |")
    print("|---|---|---|---|")
    for label in () if args.draft_only else ("plain diffusers (no LoRA)", "ours bf16 + LoRA 1.0",
                                              "ours fast + LoRA 1.0"):
        plain = results["plain diffusers (no LoRA)"]["median_step_s"]
        entry = results[label]
        print(f"| guided step, {label} | {entry['median_step_s']:.2f} | {plain / entry['median_step_s']:.2f} | "
              f"{entry.get('peak_allocated_gib', entry.get('peak_gpu_gib', 0)):.1f} / "
              f"{entry.get('peak_reserved_gib', 0):.1f} |")
    d = results["draft video"]
    print(f"| Draft video (4 steps, no guidance, decode + mp4 + sidecar) | {d['total_s']:.1f} | | "
          f"{d.get('peak_allocated_gib', 0):.1f} / {d.get('peak_reserved_gib', 0):.1f} |")
    print(f"| of which VAE decode | {d['decode_s']:.1f} | | |")
    print(f"| of which each draft step | {', '.join(f'{s:.2f}' for s in d['steps'])} | | |")
    s = results["draft sweep"]
    print(f"| Draft sweep, 4 strengths + comparison | {s['total_s']:.1f} | | "
          f"{s.get('peak_allocated_gib', 0):.1f} / {s.get('peak_reserved_gib', 0):.1f} |")
    print(f"\n{results_note}; draft warm-up {results['draft_warmup_s']:.0f} s")
    if not args.draft_only:
        print(f"fast vs bf16: velocity relative error {results['velocity_relative_error']}, final frames PSNR "
              f"{results['frames_psnr_db']:.1f} dB; compile warm-up {results['fast_warmup_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
