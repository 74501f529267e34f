"""Wan 2.2 I2V A14B against Wan 2.1 I2V 14B on one GPU (random weights of the real architectures), one command.

    python bench/wan22.py              # one H200: every case below, each in its own process
    python bench/wan22.py --tiny       # the same code paths on tiny transformers, on the CPU

Cases:
  train-2.1 / train-2.2     training step at 480x832x81 through our trainer's path (engine.training: the "80 GB"
                            preset's settings, prepare_transformer, flow_matching_loss, LocalStepper). 2.2 holds both
                            14B experts, the inactive one parked in pinned CPU memory (engine.speed.parking), steps
                            routed by engine.training.experts; reported as steps that keep the expert, steps that
                            switch it, and the expected mean for the 2.2 presets' routing (shift 5: 28 % high-noise).
  24g-2.1 / 24g-2.2         the "24 GB" presets' settings under a cap of 22 GiB of *reserved* memory (what the card
                            gives out; room is left for the CUDA context and cuBLAS workspaces on a real 24 GB card).
  generate-2.2              a guided denoising step with both experts: engine.generate.generate with a LoRA pair
                            (one per expert, apply_loras) vs plain diffusers WanImageToVideoPipeline.__call__, same
                            pipeline in memory (two 14B experts in bf16, the Wan VAE, a 2-layer UMT5 of the real width).
torch.compile is left off in the training cases (each process would compile for minutes); the same settings on
both families keep the comparison fair.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate_step import StepClock, write_lora  # noqa: E402
from train_step import host_peak_gib, make_batch, run_config, video_tokens  # noqa: E402

GIB = 1024**3
RESERVED_CAP_GIB = 22
HIGH_NOISE_SHARE = 0.2783  # P(t >= 0.9) for logit-normal t with shift 5 (TimestepSampling.cdf)
CASES = ("train-2.1", "train-2.2", "24g-2.1", "24g-2.2", "generate-2.2")


def preset_overrides(name: str) -> dict:
    from engine.training.presets import presets

    return {**presets()[name], "compile": False}


def build_expert(family, tiny: bool, device: str):
    from diffusers import WanTransformer3DModel

    from engine.core.models import build_wan_14b_transformer

    if not tiny:
        return build_wan_14b_transformer(device, torch.bfloat16, family=family)
    image = dict(image_dim=16, added_kv_proj_dim=32) if family.image_encoder else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64, **image).to(device)


def train_case(case: str, tiny: bool, steps: int, blocks_to_swap: int | None = None) -> dict:
    """Training steps of one family under a preset's settings; for 2.2 both experts, switched by a fixed pattern."""
    from engine.core.families import Wan21I2V, Wan22I2V
    from engine.speed.parking import ModelParking
    from engine.training.experts import ExpertPlan, ExpertSlot, activate
    from engine.training.model import prepare_transformer
    from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator
    from engine.training.optim import build_optimizer
    from engine.training.parallel import LocalStepper

    device = "cpu" if tiny else "cuda"
    family = Wan22I2V if case.endswith("2.2") else Wan21I2V
    low_memory = case.startswith("24g")
    overrides = preset_overrides("24 GB GPU (low memory)" if low_memory else "80 GB")
    if low_memory and blocks_to_swap is not None:
        overrides["blocks_to_swap"] = blocks_to_swap
    cfg = run_config(overrides, tiny)
    out: dict = {"case": case, "family": family.title, "notes": []}
    slots = []
    for expert in family.experts:  # built and prepared one after the other: only one full expert on the GPU
        trainable = prepare_transformer(build_expert(family, tiny, device), cfg, device)
        slot = ExpertSlot(ExpertPlan(expert, expert.t_range(family.default_boundary), cfg.optimizer.lr), trainable)
        slot.optimizer, note = build_optimizer(trainable.parameters, cfg.optimizer, torch.device(device))
        slot.stepper = LocalStepper(slot.optimizer, trainable.parameters, 1, cfg.gradient_clipping)
        if len(family.experts) > 1:
            slot.parking = ModelParking(trainable.module, device, trainable.block_swapper, slot.optimizer)
            slot.parking.park()
        slots.append(slot)
        gc.collect()
    out["notes"] += [*slots[0].trainable.notes, note]
    batch = make_batch(81 if not tiny else 9, device, tiny, dtype=torch.float32 if tiny else torch.bfloat16)
    if not family.image_encoder:
        batch.pop("image_embeds")
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        if low_memory:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(RESERVED_CAP_GIB * GIB / total)
            out["notes"].append(f"allocator capped at {RESERVED_CAP_GIB} GiB reserved of {total / GIB:.1f}")
        torch.cuda.reset_peak_memory_stats()
    # 2.2: low, low, high, high, low, ...: both experts, steps that keep the expert and steps that switch it
    pattern = [1, 1, 0, 0, 1, 1, 0, 0][:steps + 1] if len(slots) > 1 else [0] * (steps + 1)
    keep, switch, previous = [], [], None
    sampling = TimestepSampling.from_run_config(cfg)
    try:
        for step, index in enumerate(pattern):
            start = time.perf_counter()
            slot = activate(slots, index)
            loss = flow_matching_loss(slot.trainable.module, batch, timesteps_cfg=sampling,
                                      generator=micro_batch_generator(0, step, device), t_range=slot.plan.t_range)
            slot.stepper.backward(loss)
            slot.stepper.micro_step(True)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if step:  # the first step warms up the allocator and kernels
                (keep if index == previous else switch).append(elapsed)
            previous = index
            print(f"  [{case}] step {step} expert {slot.name} {elapsed:.2f} s loss {float(loss):.4f}", flush=True)
        out["ok"] = True
    except torch.OutOfMemoryError as err:
        out["ok"], out["error"] = False, "CUDA out of memory: " + str(err).split("\n")[0][:200]
    out["keep_s"] = statistics.median(keep) if keep else None
    out["switch_s"] = statistics.median(switch) if switch else None
    if out["keep_s"] and out["switch_s"]:
        p_switch = 2 * HIGH_NOISE_SHARE * (1 - HIGH_NOISE_SHARE)
        out["expected_s"] = out["keep_s"] + p_switch * (out["switch_s"] - out["keep_s"])
    else:
        out["expected_s"] = out["keep_s"]
    if device == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    out["host_gib"] = host_peak_gib()
    return out


def generate_case(tiny: bool, steps: int) -> dict:
    """Guided steps with both experts: our generate() with a LoRA pair vs the plain pipeline call."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from PIL import Image
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.core.families import Wan22I2V
    from engine.core.models import load_wan_pipeline, load_wan_tokenizer, make_tiny_wan
    from engine.generate.render import generate
    from engine.generate.request import GenerationRequest

    device = "cpu" if tiny else "cuda"
    work = Path(tempfile.mkdtemp(prefix="wan22bench-"))
    kit = make_tiny_wan(work / "kit", family=Wan22I2V)  # the tiny pipeline, or just its tokenizer
    frames, height, width = (9, 32, 32) if tiny else (81, 480, 832)
    if tiny:
        pipe = load_wan_pipeline(kit, torch.float32)
    else:
        tokenizer = load_wan_tokenizer(kit)
        torch.manual_seed(0)
        high, low = (build_expert(Wan22I2V, False, device) for _ in range(2))
        with torch.device(device):
            vae = AutoencoderKLWan().float().eval()  # Wan 2.2 A14B uses the Wan 2.1 VAE
            text_encoder = UMT5EncoderModel(UMT5Config(
                vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)).to(torch.bfloat16).eval()
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=Wan22I2V.flow_shift)
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                       transformer=high, transformer_2=low, boundary_ratio=Wan22I2V.default_boundary)
    pipe.to(device)
    rank = 4 if tiny else 32
    pair = [(str(write_lora(pipe.transformer, work / "high", rank)), 1.0, "high_noise"),
            (str(write_lora(pipe.transformer_2, work / "low", rank)), 1.0, "low_noise")]
    image_path = work / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image_path)
    request = GenerationRequest(image=str(image_path), prompt="a warrior runs", seed=0, steps=steps,
                                guidance=Wan22I2V.guidance, frames=frames, height=height, width=width, loras=pair)
    pipe.scheduler.set_timesteps(steps)
    out: dict = {"case": "generate-2.2", "steps": steps,
                 "high_noise_steps": int((pipe.scheduler.timesteps >= 900).sum())}
    times: list[float] = []

    def on_step(pipeline, step, timestep, kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return {}

    from engine.generate.request import open_image, prepare_image

    with torch.inference_mode():
        positive, negative = pipe.encode_prompt(request.prompt, request.negative_prompt,
                                                do_classifier_free_guidance=True, max_sequence_length=512,
                                                device=pipe._execution_device)
        pipe(image=prepare_image(open_image(request.image), height, width), prompt_embeds=positive,
             negative_prompt_embeds=negative, height=height, width=width, num_frames=frames,
             num_inference_steps=steps, guidance_scale=request.guidance,
             generator=torch.Generator("cpu").manual_seed(0), output_type="latent", callback_on_step_end=on_step)
    out["plain_step_s"] = [b - a for a, b in zip(times, times[1:])]
    clock = StepClock()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generate(pipe, request, on_progress=clock)
    out["ours_step_s"] = clock.step_seconds()
    if device == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    out["ok"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed after the first")
    parser.add_argument("--gen-steps", type=int, default=4, help="denoising steps (4 at shift 5: 2 per expert)")
    parser.add_argument("--tiny", action="store_true", help="tiny transformers on the CPU (checks the code paths)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    parser.add_argument("--budget-s", type=float, default=None, help="skip remaining cases after this many seconds")
    parser.add_argument("--blocks-to-swap", type=int, help="24g cases: swap this many blocks instead of the preset's")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        if args.one.startswith("24g"):
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        result = (generate_case(args.tiny, args.gen_steps) if args.one == "generate-2.2"
                  else train_case(args.one, args.tiny, args.steps, args.blocks_to_swap))
        (args.out / f"wan22_{args.one}.json").write_text(json.dumps(result))
        return 0
    started, results = time.perf_counter(), []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"budget spent: skipping {case}", flush=True)
            continue
        print(f"== {case}", flush=True)
        path = args.out / f"wan22_{case}.json"
        path.unlink(missing_ok=True)
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if case.startswith("24g") \
            else os.environ
        cmd = [sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--gen-steps",
               str(args.gen_steps), "--out", str(args.out)]
        swap = ["--blocks-to-swap", str(args.blocks_to_swap)] if args.blocks_to_swap is not None else []
        proc = subprocess.run(cmd + swap + (["--tiny"] if args.tiny else []), cwd=ROOT, env=env)
        results.append(json.loads(path.read_text()) if proc.returncode == 0 and path.exists()
                       else {"case": case, "ok": False, "error": f"exit code {proc.returncode}"})
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "tokens": video_tokens(81)}
    (args.out / "wan22.json").write_text(json.dumps(summary, indent=1))
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    print("\n| case | s/step (expert kept) | s/step (expert switched) | expected s/step | peak allocated GiB | "
          "peak reserved GiB | host GiB | note |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    by_case = {r["case"]: r for r in results}
    for r in results:
        if r["case"] == "generate-2.2" or not r.get("ok"):
            continue
        note = ""
        twin = by_case.get(r["case"].replace("2.2", "2.1"))
        if r["case"].endswith("2.2") and twin and twin.get("keep_s") and r.get("expected_s"):
            note = f"{(r['expected_s'] / twin['keep_s'] - 1) * 100:+.1f} % vs 2.1"
        print(f"| {r['case']} | {fmt(r.get('keep_s'))} | {fmt(r.get('switch_s'))} | {fmt(r.get('expected_s'))} | "
              f"{fmt(r.get('peak_allocated_gib'))} | {fmt(r.get('peak_reserved_gib'))} | {fmt(r.get('host_gib'))} | "
              f"{note} |")
    for r in results:
        if not r.get("ok"):
            print(f"{r['case']}: FAILED {r.get('error', '')}")
    gen = by_case.get("generate-2.2")
    if gen and gen.get("ok"):
        plain, ours = statistics.median(gen["plain_step_s"]), statistics.median(gen["ours_step_s"][1:] or
                                                                                   gen["ours_step_s"])
        print(f"\nguided step, both experts ({gen['high_noise_steps']} of {gen['steps']} steps high-noise): plain "
              f"diffusers {plain:.2f} s, ours with a LoRA pair {ours:.2f} s ({plain / ours:.2f}x); peak "
              f"{gen.get('peak_allocated_gib', 0):.1f} GiB allocated, {gen.get('peak_reserved_gib', 0):.1f} reserved")


if __name__ == "__main__":
    raise SystemExit(main())
