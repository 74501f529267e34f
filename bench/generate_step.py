"""Guided denoising step at 480x832x81 on the Wan 2.1 I2V 14B architecture: our generation path vs plain diffusers.

    python bench/generate_step.py            # one H100: plain diffusers, ours (bf16 + LoRA), ours fast (+ LoRA)
    python bench/generate_step.py --tiny     # the same code on the tiny kit, on the CPU

The pipeline is a real WanImageToVideoPipeline in memory: the 14B transformer (random weights, bf16), the Wan 2.1
VAE and the CLIP ViT-H/14 image encoder at their real sizes (random weights, float32, as engine.generate loads them),
a 2-layer UMT5 of the real width (the prompt is encoded once, outside the timed steps) and the tiny kit's tokenizer.
Our path is engine.generate.generate (LoRA applied by apply_loras, as the Generate tab does) with and without
engine.speed.prepare_pipeline_for_inference (the `fast` option of infer's PipelineCache). Step times come from the
generation's own per-step progress; the first step (image/condition encoding, compilation) is not counted.
Quality: relative error of the predicted velocity against the bf16 path on the same inputs, PSNR of final frames.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import count_block_flops, measure_rates, video_tokens  # noqa: E402

GIB = 1024**3
LORA_RANK = 32


def build_pipeline(tiny: bool, device: str, kit_dir: Path):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from engine.core.models import build_wan_14b_transformer, ensure_tiny_kits, load_wan_pipeline, load_wan_tokenizer

    kits = ensure_tiny_kits(kit_dir)
    if tiny:
        return load_wan_pipeline(kits.wan, torch.float32).to(device)
    tokenizer = load_wan_tokenizer(kits.wan)
    torch.manual_seed(0)
    transformer = build_wan_14b_transformer(device, torch.bfloat16)
    with torch.device(device):
        vae = AutoencoderKLWan().float().eval()  # the defaults are Wan 2.1's VAE
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu")).float().eval()
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
            relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)).to(torch.bfloat16).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=processor, image_encoder=image_encoder, transformer=transformer)


def write_lora(transformer, out_dir: Path, rank: int) -> Path:
    """A random rank-`rank` LoRA on every block Linear, saved as the trainer saves them (diffusion-pipe format)."""
    import re

    from engine.generate.lora_files import PEFT_TARGET_MODULES, save_lora

    gen = torch.Generator().manual_seed(7)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(PEFT_TARGET_MODULES, name):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02 / rank**0.5
    return save_lora(state, out_dir, rank=rank, alpha=rank, metadata={"base_model": "bench"})


class StepClock:
    """Times each denoising step from engine.generate's progress messages ("step k/N", then "decoding video")."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def __call__(self, fraction: float, message: str) -> None:
        if message.startswith("step") or message.startswith("decoding"):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((message, time.perf_counter()))

    def step_seconds(self) -> list[float]:
        steps = [t for m, t in self.marks if m.startswith("step")]
        return [b - a for a, b in zip(steps, steps[1:])]

    def decode_started(self) -> float:
        return next(t for m, t in self.marks if m.startswith("decoding"))


def run_generate(pipe, request, label: str, results: dict) -> np.ndarray:
    from engine.generate.render import generate

    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    generated = generate(pipe, request, on_progress=clock)
    end = time.perf_counter()
    steps = clock.step_seconds()
    entry = {"step_seconds": steps, "median_step_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
             "decode_s": end - clock.decode_started(), "total_s": generated.seconds}
    if torch.cuda.is_available():
        entry["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    results[label] = entry
    print(f"{label}: {json.dumps(entry)}", flush=True)
    return generated.frames


def run_plain(pipe, request, results: dict) -> None:
    """Plain diffusers: the pipeline's own __call__, no LoRA, default everything."""
    from engine.generate.request import open_image, prepare_image

    image = prepare_image(open_image(request.image), request.height, request.width)
    times: list[float] = []

    def on_step(pipeline, step, timestep, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return {}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        positive, negative = pipe.encode_prompt(request.prompt, request.negative_prompt,
                                                do_classifier_free_guidance=True, max_sequence_length=512,
                                                device=pipe._execution_device)
        pipe(image=image, prompt_embeds=positive, negative_prompt_embeds=negative, height=request.height,
             width=request.width, num_frames=request.frames, num_inference_steps=request.steps,
             guidance_scale=request.guidance, generator=torch.Generator("cpu").manual_seed(0),
             output_type="latent", callback_on_step_end=on_step)
    steps = [b - a for a, b in zip(times, times[1:])]
    entry = {"step_seconds": steps, "median_step_s": statistics.median(steps)}
    if torch.cuda.is_available():
        entry["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    results["plain diffusers (no LoRA)"] = entry
    print(f"plain: {json.dumps(entry)}", flush=True)


def velocity(pipe, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return pipe.transformer(**inputs, return_dict=False)[0].float()


def velocity_inputs(pipe, frames: int, height: int, width: int, device: str, tiny: bool) -> list[dict]:
    gen = torch.Generator("cpu").manual_seed(3)
    t = pipe.transformer.config
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    dtype = pipe.transformer.dtype
    text_dim = t.text_dim
    image_dim = t.image_dim
    img_tokens = 17 if tiny else 257
    base = dict(hidden_states=torch.randn(1, t.in_channels, *lat, generator=gen).to(device, dtype),
                encoder_hidden_states=torch.randn(1, 512, text_dim, generator=gen).to(device, dtype),
                encoder_hidden_states_image=torch.randn(1, img_tokens, image_dim, generator=gen).to(device, dtype))
    return [dict(base, timestep=torch.tensor([ts], device=device)) for ts in (900.0, 300.0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per timed generation (first dropped)")
    parser.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    parser.add_argument("--no-rates", action="store_true", help="skip measuring the card's matmul/SDPA rates")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    args = parser.parse_args(argv)

    from engine.generate.pipeline import apply_loras
    from engine.generate.request import GenerationRequest
    from engine.speed.inference import prepare_pipeline_for_inference

    device = "cpu" if args.tiny else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="genbench-"))
    frames, height, width = (9, 32, 32) if args.tiny else (81, 480, 832)
    results: dict = {"config": {"frames": frames, "height": height, "width": width, "steps": args.steps,
                                "guidance": 5.0, "lora_rank": LORA_RANK}}
    if not args.tiny and not args.no_rates:
        results["rates"] = measure_rates([video_tokens(frames)])
    started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, work / "kits").to(device)
    print(f"pipeline built in {time.perf_counter() - started:.1f} s", flush=True)
    lora = write_lora(pipe.transformer, work / "lora", 4 if args.tiny else LORA_RANK)
    from PIL import Image

    image_path = work / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image_path)
    request = GenerationRequest(image=str(image_path), prompt="a warrior runs across a field", seed=0,
                                      steps=args.steps, guidance=5.0, frames=frames, height=height, width=width,
                                      loras=[(str(lora), 1.0)])

    run_plain(pipe, request, results)
    frames_bf16 = run_generate(pipe, request, "ours bf16 + LoRA 1.0", results)
    inputs = velocity_inputs(pipe, frames, height, width, device, args.tiny)
    v_ref = [velocity(pipe, x) for x in inputs]

    # As the Generate tab does it: the fast path is applied to a pipeline without LoRA layers, the LoRA comes after.
    pipe.unload_lora_weights()
    for key in ("_studio_adapters", "_studio_adapter_info"):  # engine.generate's record of loaded adapters
        pipe.__dict__.pop(key, None)
    t0 = time.perf_counter()
    report = prepare_pipeline_for_inference(pipe, compile=not args.no_compile)
    results["fast_setup_s"] = time.perf_counter() - t0
    results["fast_notes"] = report.notes
    print(f"fast path: {report.notes} in {results['fast_setup_s']:.1f} s", flush=True)
    warm = GenerationRequest(**{**request.__dict__, "steps": 2})
    t0 = time.perf_counter()
    run_generate(pipe, warm, "fast warm-up (compiles)", results)
    results["fast_warmup_s"] = time.perf_counter() - t0
    frames_fast = run_generate(pipe, request, "ours fast + LoRA 1.0", results)
    v_fast = [velocity(pipe, x) for x in inputs]
    results["velocity_relative_error"] = [float((f - r).norm() / r.norm()) for f, r in zip(v_fast, v_ref)]
    results["frames_psnr_db"] = psnr(frames_fast, frames_bf16)

    t0 = time.perf_counter()
    apply_loras(pipe, [(str(lora), 0.5)])
    results["strength_change_s"] = time.perf_counter() - t0
    run_generate(pipe, GenerationRequest(**{**request.__dict__, "loras": [(str(lora), 0.5)], "steps": 3}),
                 "ours fast + LoRA 0.5 (after a strength change)", results)
    run_generate(pipe, GenerationRequest(**{**request.__dict__, "loras": [], "steps": 3}),
                 "ours fast, no LoRA", results)

    tokens = video_tokens(frames, height, width)
    fl = count_block_flops(tokens, recompute=None, lora=True)
    per_step_flops = 2 * (fl.linear_forward + fl.attention_forward)  # two guided passes
    results["counted_tflop_per_step"] = per_step_flops / 1e12
    (args.out / "generate_step.json").write_text(json.dumps(results, indent=1))

    print("\n| path | s/step (guided) | TFLOP/s | peak GPU GiB | VAE decode s |")
    print("|---|---|---|---|---|")
    plain = results["plain diffusers (no LoRA)"]["median_step_s"]
    for label, entry in results.items():
        if isinstance(entry, dict) and "median_step_s" in entry and "warm-up" not in label:
            s = entry["median_step_s"]
            speed = "" if label.startswith("plain") else f" ({plain / s:.2f}x plain)"
            print(f"| {label} | {s:.2f}{speed} | {per_step_flops / s / 1e12:.0f} | {entry.get('peak_gpu_gib', 0):.1f} "
                  f"| {entry.get('decode_s', float('nan')):.1f} |")
    print(f"\nvelocity relative error vs bf16 path (t=900, t=300): {results['velocity_relative_error']}")
    print(f"final frames PSNR fast vs bf16: {results['frames_psnr_db']:.1f} dB")
    print(f"LoRA strength change (apply_loras): {results['strength_change_s']:.3f} s; fast setup "
          f"{results['fast_setup_s']:.1f} s; warm-up generation {results['fast_warmup_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
