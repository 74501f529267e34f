"""End-to-end generation on the real Wan 2.1 I2V 14B architecture (random weights) through engine.generate.

Measures, in one process on one GPU, at 480x832x81 with guidance: seconds per denoising step of plain diffusers'
WanImageToVideoPipeline, of our generation path without a LoRA and with a rank-32 LoRA at strength 1 (loaded the
way the Generate tab loads it), the cost of changing the strength, VAE decode time, and peak memory. The text and
image encoders are shrunk to one or two layers of the real widths (4096 and 1280): they run once per video and do
not change the per-step figures. Prints a Markdown table.

    python bench/generate_e2e.py [--steps 3] [--frames 81] [--height 480 --width 832] [--out DIR]
    python bench/generate_e2e.py --modes   # memory modes and fast mode on the tiny kit through PipelineCache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.generate  # noqa: E402
from engine.core.models import build_wan_14b_transformer, load_wan_tokenizer, make_tiny_wan
from engine.generate.lora_files import save_lora
from engine.generate.pipeline import PipelineCache, PipelineOptions, apply_loras
from engine.generate.render import generate_with_cache, read_sidecar, render_video
from engine.generate.request import GenerationRequest


def write_with_opencv(frames, path, fps: float, crf: int = 18) -> Path:
    """mp4 through OpenCV, for GPU machines without ffmpeg (only the bench uses it; timings exclude writing)."""
    import cv2

    frames = list(frames)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return Path(path)


def build_pipeline(device: torch.device, work: Path):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    tokenizer = load_wan_tokenizer(make_tiny_wan(work / "tiny-wan"))  # the tiny kit's word-level tokenizer
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=tokenizer.vocab_size + 8, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=8,
        relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).to(device, torch.bfloat16).eval()
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1280, num_hidden_layers=2, num_attention_heads=16, image_size=224, patch_size=14,
        intermediate_size=1280,
    )).to(device).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    vae = AutoencoderKLWan().to(device).eval()  # the real Wan 2.1 VAE configuration
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    transformer = build_wan_14b_transformer(str(device), torch.bfloat16).eval()
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
                                   image_processor=processor, vae=vae, scheduler=scheduler, transformer=transformer)


def random_lora(transformer, out_dir: Path, rank: int = 32) -> Path:
    """A rank-32 LoRA on every block Linear (diffusion-pipe's targets) with small random weights."""
    from engine.generate.lora_files import wan_module_names

    state, generator = {}, torch.Generator().manual_seed(0)
    targets = set(wan_module_names().values())
    for name, module in transformer.named_modules():
        if name.startswith("blocks.") and name.count(".") >= 2 and name.split(".", 2)[2] in targets:
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.001
    return save_lora({k: v.to(torch.bfloat16) for k, v in state.items()}, out_dir, rank=rank, alpha=rank)


class StepClock:
    """Step timestamps from the progress callback: per-step seconds without the first (warm-up) step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, str]] = []

    def __call__(self, fraction: float, message: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), message))

    def step_seconds(self) -> list[float]:
        steps = [t for t, m in self.marks if m.startswith("step ")]
        return [b - a for a, b in zip(steps[1:], steps[2:])]

    def decode_seconds(self) -> float:
        start = next(t for t, m in self.marks if m == "decoding video")
        end = next(t for t, m in self.marks if m.startswith("wrote"))
        return end - start


def check_modes(work: Path, out: Path) -> None:
    """PipelineCache on the GPU with the tiny kit: plain, CPU offload + VAE tiling, plain again, fast mode."""
    from PIL import Image

    from engine.core.models import load_wan_transformer

    model = str(make_tiny_wan(work / "tiny-wan"))
    image = work / "small.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8")).save(image)
    lora = random_lora(load_wan_transformer(model, torch.float32), work / "tiny-lora" / "epoch1", rank=4)
    request = GenerationRequest(image=str(image), prompt="a warrior jumps", seed=3, steps=3, frames=9, height=32,
                                width=48, loras=[(str(lora), 1.0)])
    cache = PipelineCache()
    hashes = {}
    for name, options in (
        ("plain", PipelineOptions(model=model)),
        ("cpu offload + vae tiling", PipelineOptions(model=model, cpu_offload=True, vae_tiling=True)),
        ("plain again", PipelineOptions(model=model)),
        ("fast", PipelineOptions(model=model, fast=True)),
    ):
        try:
            begin = time.perf_counter()
            path = generate_with_cache(cache, options, request, out / f"modes-{name.replace(' ', '_')}.mp4")
            sidecar = read_sidecar(path)
            hashes[name] = sidecar["frames_sha256"]
            print(f"{name}: ok in {time.perf_counter() - begin:.1f} s, device {sidecar['device']}, "
                  f"dtype {sidecar['dtype']}, offload {sidecar['cpu_offload']}, fast {sidecar['fast']}, "
                  f"same frames as plain: {hashes[name] == hashes.get('plain')}", flush=True)
        except Exception as err:  # report every mode, not just the first failure
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
    cache.unload()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--modes", action="store_true", help="check memory and fast modes on the tiny kit only")
    args = parser.parse_args()
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        engine.generate.write_video = write_with_opencv
    device = torch.device("cuda")
    work = Path(tempfile.mkdtemp(prefix="gen-e2e-"))
    out = args.out or work / "out"
    out.mkdir(parents=True, exist_ok=True)
    if args.modes:
        check_modes(work, out)
        return 0
    from PIL import Image

    image = work / "start.png"
    Image.fromarray((np.random.RandomState(0).rand(args.height, args.width, 3) * 255).astype("uint8")).save(image)

    started = time.perf_counter()
    pipe = build_pipeline(device, work)
    print(f"built pipeline in {time.perf_counter() - started:.1f} s on {torch.cuda.get_device_name()}", flush=True)
    request = GenerationRequest(image=str(image), prompt="a warrior jumps, fast camera pan", seed=1,
                                steps=args.steps, guidance=5.0, frames=args.frames, height=args.height,
                                width=args.width)
    rows = []

    # 1. plain diffusers, prompts as text, as a user of diffusers would call it
    step_marks: list[float] = []

    def mark(pipeline, step, timestep, kwargs):
        torch.cuda.synchronize()
        step_marks.append(time.perf_counter())
        return {}

    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        begin = time.perf_counter()
        pipe(image=Image.open(image), prompt=request.prompt, negative_prompt=request.negative_prompt,
             height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
             guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1), output_type="latent",
             callback_on_step_end=mark)
    plain = [b - a for a, b in zip(step_marks, step_marks[1:])]
    rows.append(("plain diffusers WanImageToVideoPipeline (no LoRA)", plain, None,
                 torch.cuda.max_memory_allocated() / 2**30))
    print(f"plain: first step {step_marks[0] - begin:.2f} s, then {plain}", flush=True)

    # 2. our path without a LoRA, 3. with a rank-32 LoRA at strength 1
    lora = random_lora(pipe.transformer, work / "lora" / "epoch1")
    variants = (("engine.generate, no LoRA", []), ("engine.generate, rank-32 LoRA at strength 1", [(str(lora), 1.0)]))
    for label, loras in variants:
        clock = StepClock()
        torch.cuda.reset_peak_memory_stats()
        path = render_video(pipe, GenerationRequest(**{**request.__dict__, "loras": loras}),
                            out / f"{label.split(',')[1].strip().replace(' ', '_')}.mp4", on_progress=clock,
                            model="random 14B architecture")
        rows.append((label, clock.step_seconds(), clock.decode_seconds(), torch.cuda.max_memory_allocated() / 2**30))
        print(f"{label}: {clock.step_seconds()} decode {clock.decode_seconds():.1f} s -> {path}", flush=True)

    # 4. changing the strength: set_adapters only, no reload
    begin = time.perf_counter()
    apply_loras(pipe, [(str(lora), 0.5)])
    torch.cuda.synchronize()
    strength_change = time.perf_counter() - begin

    tokens = (args.frames - 1) // 4 + 1
    tokens *= (args.height // 16) * (args.width // 16)
    print(f"\n{args.width}x{args.height}x{args.frames} ({tokens} tokens), guidance 5 (2 passes/step), "
          f"{args.steps} steps, bf16, {torch.cuda.get_device_name()}\n")
    print("| path | s/step (median, after warm-up) | VAE decode s | peak GiB |")
    print("|---|---|---|---|")
    for label, steps, decode, peak in rows:
        median = statistics.median(steps) if steps else float("nan")
        print(f"| {label} | {median:.2f} | {'' if decode is None else f'{decode:.1f}'} | {peak:.1f} |")
    print(f"\nstrength change 1.0 -> 0.5 (set_adapters, no reload): {strength_change:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
