"""Data-parallel training throughput on 1 vs N GPUs of one machine (issue 9), 14B architecture, 480x832x33.

    python bench/multi_gpu.py                  # 1 GPU, then all visible GPUs; prints samples/s and the scaling
    python bench/multi_gpu.py --gpus 1 2 --steps 4

Each run is `torchrun --nproc_per_node N bench/multi_gpu.py --worker`: every rank joins through the trainer's
start_world (DeepSpeed's init_distributed), builds the transformer (random weights) on its GPU, prepares it with
engine.training's prepare_transformer (the fastest settings found by bench/train_step.py), and steps with the trainer's
stepper: DeepSpeedStepper (ZeRO stage 0, gradients averaged every step) on several ranks, LocalStepper on one.
Every rank trains on its own micro-batch, so samples per step = number of ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SETTINGS = {"model.transformer_dtype": "bfloat16", "activation_checkpointing": True,
            "studio.selective_checkpointing": True, "compile": True, "optimizer.type": "adamw"}


def worker(args) -> int:
    from train_step import make_batch, run_config

    from engine.core.models import build_wan_14b_transformer
    from engine.training.model import prepare_transformer
    from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator
    from engine.training.optim import build_optimizer
    from engine.training.parallel import DeepSpeedStepper, LocalStepper, start_world

    world, device = start_world()
    cfg = run_config(dict(SETTINGS), tiny=False)
    transformer = build_wan_14b_transformer(str(device), torch.bfloat16)
    trainable = prepare_transformer(transformer, cfg, device)
    optimizer, _ = build_optimizer(trainable.parameters, cfg.optimizer, device)
    if world.distributed:
        stepper = DeepSpeedStepper(optimizer, trainable.parameters, 1, cfg.gradient_clipping, 1)
    else:
        stepper = LocalStepper(optimizer, trainable.parameters, 1, cfg.gradient_clipping)
    batch = make_batch(args.frames, device, tiny=False)
    timesteps = TimestepSampling.from_run_config(cfg)
    times = []
    for step in range(args.warmup + args.steps):
        if world.distributed:
            torch.distributed.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        gen = micro_batch_generator(0, step * world.world_size + world.rank, device)
        loss = flow_matching_loss(trainable.module, batch, timesteps_cfg=timesteps, generator=gen)
        stepper.backward(loss)
        stepper.micro_step(True)
        torch.cuda.synchronize()
        if world.distributed:
            torch.distributed.barrier()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        if world.is_main:
            print(f"  [{world.world_size} GPU] step {step} {elapsed:.2f} s loss {float(loss):.4f}", flush=True)
    if world.is_main:
        per_step = statistics.median(times)
        Path(args.json).write_text(json.dumps({
            "gpus": world.world_size, "seconds_per_step": per_step, "samples_per_s": world.world_size / per_step,
            "step_times": times, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 1024**3,
            "device": torch.cuda.get_device_name()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts to run (default 1 and all)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    args.out.mkdir(parents=True, exist_ok=True)
    counts = args.gpus or sorted({1, torch.cuda.device_count()})
    results = []
    for n in counts:
        json_path = args.out / f"multi_gpu_{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--frames", str(args.frames), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--json", str(json_path)]
        print(f"== {n} GPU(s)", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode == 0 and json_path.exists():
            results.append(json.loads(json_path.read_text()))
        else:
            results.append({"gpus": n, "error": f"exit code {proc.returncode}"})
    (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=1))
    base = next((r["samples_per_s"] for r in results if r.get("gpus") == 1 and "samples_per_s" in r), None)
    print(f"\n480x832x{args.frames}, batch 1 per GPU, settings {SETTINGS}")
    print("| GPUs | s/step | samples/s | scaling vs 1 GPU | peak GPU GiB |\n|---|---|---|---|---|")
    for r in results:
        if "samples_per_s" not in r:
            print(f"| {r['gpus']} | failed: {r['error']} | | | |")
            continue
        scale = f"{r['samples_per_s'] / base:.2f}x" if base else ""
        print(f"| {r['gpus']} | {r['seconds_per_step']:.2f} | {r['samples_per_s']:.3f} | {scale} | "
              f"{r['peak_gpu_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
