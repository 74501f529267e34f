"""Training step speed and memory on the Wan 2.1 I2V 14B architecture (random weights), ours vs plain diffusers + peft.

    python bench/train_step.py                         # one H100: every variant at 81 and 33 frames + card rates
    python bench/train_step.py --variants ours-bf16,reference --frames 81
    python bench/train_step.py --tiny                  # the same code paths on a tiny transformer, on the CPU

Each (variant, frames) runs in its own process (a fresh CUDA context: the 24 GiB cap and pinned memory do not leak
into the next one). A variant is our trainer's code path -- engine.training.prepare_transformer with a RunConfig,
flow_matching_loss, build_optimizer, LocalStepper -- or the plain reference: diffusers' own gradient checkpointing,
a peft LoRA in float32, bf16 autocast, torch AdamW. Batch: one clip of the cached-item shapes (latents
[1,16,F',60,104], condition [1,20,F',60,104], text [1,512,4096], CLIP [1,257,1280]). FLOPs are counted from the
architecture (count_block_flops); the floor divides them by matmul and attention rates measured in the same call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
HEIGHT, WIDTH = 480, 832
TEXT_TOKENS, IMAGE_TOKENS = 512, 257
LORA_RANK = 32
LOW_MEMORY_CAP_GIB = 24

# Our variants as RunConfig overrides (the trainer reads exactly these keys); "reference" is plain diffusers + peft.
SELECTIVE = {"activation_checkpointing": True, "studio.selective_checkpointing": True}
FLOAT8_MATMULS = {"model.transformer_dtype": "float8", "studio.float8_matmuls": True}
VARIANTS: dict[str, dict] = {
    "reference": {},
    "ours-bf16": {"model.transformer_dtype": "bfloat16", **SELECTIVE, "compile": True, "optimizer.type": "adamw"},
    "ours-fp8": {**FLOAT8_MATMULS, **SELECTIVE, "compile": True, "optimizer.type": "adamw"},
    "ours-fp8-bf16-backward": {**FLOAT8_MATMULS, **SELECTIVE, "compile": True, "optimizer.type": "adamw",
                               "bench.float8_backward": False},
    "ours-bf16-full": {"model.transformer_dtype": "bfloat16", "activation_checkpointing": True, "compile": True,
                       "optimizer.type": "adamw"},
    "ours-eager": {"model.transformer_dtype": "bfloat16", **SELECTIVE, "compile": False, "optimizer.type": "adamw"},
    "low-memory-24g": {**FLOAT8_MATMULS, "activation_checkpointing": "unsloth", "blocks_to_swap": 28,
                       "compile": True, "optimizer.type": "AdamW8bit"},
}
DEFAULT_VARIANTS = ("reference", "ours-bf16", "ours-fp8", "low-memory-24g")


# ---------------------------------------------------------------------------------------------- FLOP counting

@dataclass
class StepFlops:
    """FLOPs of one training step, split by where they run (linears incl. LoRA vs attention)."""

    linear_forward: float
    attention_forward: float
    self_attention_forward: float
    linear_backward: float
    attention_backward: float
    linear_recompute: float
    attention_recompute: float

    @property
    def total(self) -> float:
        return (self.linear_forward + self.attention_forward + self.linear_backward + self.attention_backward
                + self.linear_recompute + self.attention_recompute)

    @property
    def linear(self) -> float:
        return self.linear_forward + self.linear_backward + self.linear_recompute

    @property
    def attention(self) -> float:
        return self.attention_forward + self.attention_backward + self.attention_recompute


def video_tokens(frames: int, height: int = HEIGHT, width: int = WIDTH) -> int:
    """Tokens the transformer sees: VAE /4 in time (+1), /8 in space, then 1x2x2 patches."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def count_block_flops(tokens: int, *, dim: int = 5120, ffn: int = 13824, blocks: int = 40, rank: int = LORA_RANK,
                      recompute: str | None = "full", lora: bool = True) -> StepFlops:
    """Matmul FLOPs (2 per multiply-add) of the blocks, which hold all but ~0.1 % of the work.

    Backward of a frozen linear computes only the input gradient (1x forward); LoRA adds its own forward and 2x
    backward; attention backward is 2.5x forward (five matmuls against two). Context: 512 text + 257 image tokens.
    The text/image key and value projections get no backward (nothing upstream needs a gradient).
    recompute: None (keep everything), 'full' (whole block again), 'selective' (all but the self-attention).
    """
    t, d = tokens, dim
    on_tokens = [(d, d)] * 6 + [(d, ffn), (ffn, d)]          # attn1 q,k,v,o; attn2 q,o; ffn up, down
    lin_tok = sum(2 * t * i * o for i, o in on_tokens)
    lin_ctx = 2 * 2 * (TEXT_TOKENS + IMAGE_TOKENS) * d * d
    lora_fwd = 0.0
    if lora:
        lora_fwd = sum(2 * t * (i + o) * rank for i, o in on_tokens) + 4 * (TEXT_TOKENS + IMAGE_TOKENS) * 2 * d * rank
    self_attn = 4 * t * t * d
    cross_attn = 4 * t * (TEXT_TOKENS + IMAGE_TOKENS) * d
    linear_forward = lin_tok + lin_ctx + lora_fwd
    linear_backward = lin_tok + 2 * lora_fwd
    attention_forward = self_attn + cross_attn
    recompute_linear = linear_forward if recompute else 0.0
    recompute_attention = {None: 0.0, "full": attention_forward, "offload": attention_forward,
                           "selective": cross_attn}[recompute]
    return StepFlops(blocks * linear_forward, blocks * attention_forward, blocks * self_attn, blocks * linear_backward,
                     blocks * 2.5 * attention_forward, blocks * recompute_linear, blocks * recompute_attention)


# ---------------------------------------------------------------------------------------------- card rates

def _time_cuda(fn, repeats: int = 10) -> float:
    """Median seconds of fn() over CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def measure_rates(tokens_list: list[int]) -> dict:
    """bf16 and float8 matmul TFLOP/s at the FFN shape; SDPA TFLOP/s (forward, forward+backward) per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rates: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    m, k, n = 32760, 5120, 13824
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    rates["bf16_mm_ffn"] = 2 * m * k * n / _time_cuda(lambda: a @ b.t()) / 1e12
    b2 = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    rates["bf16_mm_qkvo"] = 2 * m * k * k / _time_cuda(lambda: a @ b2.t()) / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    rates["fp8_scaled_mm_ffn_rowwise"] = 2 * m * k * n / _time_cuda(
        lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)) / 1e12
    del a, b, b2, a8, b8
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for tokens in tokens_list:
        q, kk, v = (torch.randn(1, 40, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3))
        flops = 4 * tokens * tokens * 5120
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    fwd = _time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, v), 5)
                    out = torch.nn.functional.scaled_dot_product_attention(q, kk, v)
                    grad = torch.randn_like(out)

                    def fwd_bwd():
                        o = torch.nn.functional.scaled_dot_product_attention(q, kk, v)
                        torch.autograd.grad(o, (q, kk, v), grad)

                    both = _time_cuda(fwd_bwd, 5)
                rates[f"sdpa_{name}_{tokens}_fwd"] = flops / fwd / 1e12
                rates[f"sdpa_{name}_{tokens}_fwd_bwd"] = 3.5 * flops / both / 1e12
                rates[f"sdpa_{name}_{tokens}_bwd"] = 2.5 * flops / max(both - fwd, 1e-9) / 1e12
            except RuntimeError as err:
                rates[f"sdpa_{name}_{tokens}"] = f"unavailable: {str(err)[:80]}"
        with torch.no_grad():  # the backends must agree before their speeds mean anything
            outs = {}
            for name in ("flash", "cudnn"):
                try:
                    with sdpa_kernel([backends[name]]):
                        outs[name] = torch.nn.functional.scaled_dot_product_attention(q, kk, v).float()
                except RuntimeError:
                    pass
            if len(outs) == 2:
                rates[f"sdpa_cudnn_vs_flash_rel_err_{tokens}"] = float(
                    (outs["cudnn"] - outs["flash"]).norm() / outs["flash"].norm())
        del q, kk, v
    torch.cuda.empty_cache()
    return rates


def floor_seconds(flops: StepFlops, rates: dict, tokens: int, linear_rate_key: str = "bf16_mm_ffn") -> float:
    """Linear FLOPs at the measured matmul rate + attention at the best measured SDPA backend's rates."""
    best = None
    for name in ("flash", "cudnn", "efficient"):
        fwd, bwd = rates.get(f"sdpa_{name}_{tokens}_fwd"), rates.get(f"sdpa_{name}_{tokens}_bwd")
        if isinstance(fwd, float) and isinstance(bwd, float):
            t = (flops.attention_forward + flops.attention_recompute) / fwd + flops.attention_backward / bwd
            best = t if best is None else min(best, t)
    return flops.linear / (rates[linear_rate_key] * 1e12) + (best or 0.0) / 1e12


# ---------------------------------------------------------------------------------------------- one variant

@dataclass
class Outcome:
    variant: str
    frames: int
    tokens: int
    ok: bool
    seconds_per_step: float | None = None
    step_times: list[float] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    peak_gpu_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_host_gib: float | None = None
    swapped_blocks: int = 0
    swapped_host_gib: float = 0.0
    counted_tflop: float = 0.0
    tflops: float | None = None
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""


def _tiny_transformer(device):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=16, added_kv_proj_dim=32, rope_max_seq_len=64).to(device)


def make_batch(frames: int, device, tiny: bool, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes CachedDataset.load gives, with a leading batch dimension of 1."""
    latent_frames = (frames - 1) // 4 + 1
    h, w, text_dim, img_tokens, img_dim = (8, 8, 32, 5, 16) if tiny else (HEIGHT // 8, WIDTH // 8, 4096, 257, 1280)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return {"latents": rand(1, 16, latent_frames, h, w), "condition": rand(1, 20, latent_frames, h, w),
            "text_embeds": rand(1, TEXT_TOKENS, text_dim, dtype=dtype),
            "image_embeds": rand(1, img_tokens, img_dim, dtype=dtype)}


def run_config(overrides: dict, tiny: bool):
    from engine.training.form import apply_overrides
    from engine.training.schema import RunConfig

    overrides = {k: v for k, v in overrides.items() if not k.startswith("bench.")}  # bench-only switches
    cfg = apply_overrides(RunConfig(output_dir="bench-run", dataset="dataset.toml"),
                          {"adapter.rank": 4 if tiny else LORA_RANK, **overrides})
    if tiny:  # no inductor on the CPU box: the compiled path is exercised by the accel tests
        cfg = apply_overrides(cfg, {"compile": False, "model.dtype": "float32",
                                    "blocks_to_swap": min(cfg.blocks_to_swap, 2)})
    return cfg


def prepare_ours(transformer, overrides: dict, device, tiny: bool):
    """Our trainer's path: prepare_transformer + build_optimizer + LocalStepper, as engine.training runs them."""
    from engine.training.model import prepare_transformer
    from engine.training.objective import TimestepSampling
    from engine.training.optim import build_optimizer
    from engine.training.parallel import LocalStepper

    cfg = run_config(overrides, tiny)
    trainable = prepare_transformer(transformer, cfg, device)
    optimizer, note = build_optimizer(trainable.parameters, cfg.optimizer, torch.device(device))
    stepper = LocalStepper(optimizer, trainable.parameters, 1, cfg.gradient_clipping)
    notes = [*trainable.notes, note]
    if "bench.float8_backward" in overrides:
        from engine.speed.float8 import Float8Linear

        for module in trainable.module.modules():
            if isinstance(module, Float8Linear):
                module.float8_backward = overrides["bench.float8_backward"]
        notes.append(f"float8 backward: {overrides['bench.float8_backward']}")
    swapped = cfg.blocks_to_swap
    swapper = trainable.block_swapper
    return trainable.module, stepper, TimestepSampling.from_run_config(cfg), notes, swapped, swapper


def prepare_reference(transformer, device):
    """Plain diffusers + peft: the documented way (enable_gradient_checkpointing, fp32 LoRA, torch AdamW)."""
    from peft import LoraConfig

    from engine.generate.lora_files import PEFT_TARGET_MODULES
    from engine.training.objective import TimestepSampling
    from engine.training.parallel import LocalStepper

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=PEFT_TARGET_MODULES))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.99), weight_decay=0.01)
    return transformer, LocalStepper(optimizer, params, 1, 0.0), TimestepSampling(), ["diffusers + peft reference"]


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_one(variant: str, frames: int, *, steps: int, warmup: int, tiny: bool, cap_gib: float | None) -> Outcome:
    from engine.training.objective import flow_matching_loss, micro_batch_generator

    device = "cpu" if tiny else "cuda"
    tokens = video_tokens(frames, 64, 64) if tiny else video_tokens(frames)
    outcome = Outcome(variant, frames, tokens, ok=False)
    transformer = _tiny_transformer(device) if tiny else None
    if transformer is None:
        from engine.core.models import build_wan_14b_transformer

        transformer = build_wan_14b_transformer("cuda", torch.bfloat16)
    swapper = None
    if variant == "reference":
        model, stepper, timesteps, notes = prepare_reference(transformer, device)
        recompute = "full"
    else:
        overrides = VARIANTS[variant]
        model, stepper, timesteps, notes, outcome.swapped_blocks, swapper = prepare_ours(
            transformer, overrides, device, tiny)
        recompute = run_config(overrides, tiny).checkpointing_mode
    outcome.notes = notes
    if swapper is not None:
        outcome.swapped_host_gib = swapper.host_bytes / GIB
    batch = make_batch(frames, device, tiny, dtype=torch.float32 if tiny else torch.bfloat16)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        if cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
            outcome.notes.append(f"GPU memory capped at {cap_gib} GiB of {total / GIB:.1f}")
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            gen = micro_batch_generator(0, step, device)
            loss = flow_matching_loss(model, batch, timesteps_cfg=timesteps, generator=gen)
            stepper.backward(loss)
            stepper.micro_step(True)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            (outcome.warmup_seconds if step < warmup else outcome.step_times).append(elapsed)
            outcome.losses.append(float(loss))
            print(f"  [{variant} {frames}f] step {step} {'(warm-up) ' if step < warmup else ''}{elapsed:.2f} s "
                  f"loss {float(loss):.4f}", flush=True)
        outcome.ok = True
    except torch.OutOfMemoryError as err:
        outcome.error = "CUDA out of memory: " + str(err).split("\n")[0][:200]
    outcome.seconds_per_step = statistics.median(outcome.step_times) if outcome.step_times else None
    if device == "cuda":
        outcome.peak_gpu_gib = torch.cuda.max_memory_allocated() / GIB
        outcome.peak_reserved_gib = torch.cuda.max_memory_reserved() / GIB
    outcome.peak_host_gib = host_peak_gib()
    if tiny:
        flops = count_block_flops(tokens, dim=32, ffn=64, blocks=3, rank=4, recompute=recompute)
    else:
        flops = count_block_flops(tokens, recompute=recompute)
    outcome.counted_tflop = flops.total / 1e12
    if outcome.seconds_per_step:
        outcome.tflops = outcome.counted_tflop / outcome.seconds_per_step
    return outcome


# ---------------------------------------------------------------------------------------------- float8 parity

def gradient_parity(frames: int, tiny: bool) -> dict:
    """Loss and LoRA gradients of one step on the same batch and noise: bf16 base weights vs float8 matmuls with the
    backward in bf16 vs in float8 (the model is converted in place, after peft, as the trainer does)."""
    from engine.speed.float8 import Float8Linear, apply_float8_compute
    from engine.training.objective import flow_matching_loss, micro_batch_generator

    device = "cpu" if tiny else "cuda"
    if tiny:
        transformer = _tiny_transformer(device)
    else:
        from engine.core.models import build_wan_14b_transformer

        transformer = build_wan_14b_transformer("cuda", torch.bfloat16)
    model, _, timesteps, _, _, _ = prepare_ours(
        transformer, {"model.transformer_dtype": "bfloat16", **SELECTIVE, "compile": False}, device, tiny)
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give it values so every LoRA matrix gets a gradient
            p.data = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype)
    batch = make_batch(frames, device, tiny, dtype=torch.float32 if tiny else torch.bfloat16)

    def loss_and_grad():
        for p in params:
            p.grad = None
        loss = flow_matching_loss(model, batch, timesteps_cfg=timesteps, generator=micro_batch_generator(0, 0, device))
        loss.backward()
        return float(loss), torch.cat([p.grad.float().flatten() for p in params]).cpu()

    loss_ref, grad_ref = loss_and_grad()
    out = {"frames": frames, "loss_bf16": loss_ref}
    apply_float8_compute(model, require_float8_device=not tiny,
                         compute_dtype=torch.float32 if tiny else torch.bfloat16)
    for float8_backward in (False, True):
        for module in model.modules():
            if isinstance(module, Float8Linear):
                module.float8_backward = float8_backward
        loss, grad = loss_and_grad()
        key = "float8_fwd_bwd" if float8_backward else "float8_fwd"
        out[f"loss_{key}"] = loss
        out[f"loss_rel_diff_{key}"] = abs(loss - loss_ref) / abs(loss_ref)
        out[f"grad_rel_err_{key}"] = float((grad - grad_ref).norm() / grad_ref.norm())
        out[f"grad_cosine_{key}"] = float(torch.nn.functional.cosine_similarity(grad, grad_ref, dim=0))
    print("gradient parity:", json.dumps(out), flush=True)
    return out


# ---------------------------------------------------------------------------------------------- driver

def _child(args) -> int:
    if args.one.startswith("low-memory"):  # less fragmentation under the 24 GiB cap (set before CUDA starts)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    outcome = run_one(args.one, args.frames[0], steps=args.steps, warmup=args.warmup, tiny=args.tiny,
                      cap_gib=LOW_MEMORY_CAP_GIB if args.one.startswith("low-memory") and not args.tiny else None)
    Path(args.json).write_text(json.dumps(asdict(outcome)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 33])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--blocks-to-swap", type=int, default=None, help="override the low-memory variant's")
    parser.add_argument("--tiny", action="store_true", help="tiny transformer on the CPU (checks the code paths)")
    parser.add_argument("--no-rates", action="store_true", help="skip measuring the card's matmul/SDPA rates")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    parser.add_argument("--budget-s", type=float, default=None, help="skip remaining runs after this many seconds")
    parser.add_argument("--parity-frames", type=int, default=0,
                        help="also compare loss and LoRA gradients: bf16 vs float8 matmuls, at this frame count")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blocks_to_swap is not None:
        VARIANTS["low-memory-24g"]["blocks_to_swap"] = args.blocks_to_swap
    if args.one == "parity":
        out = gradient_parity(args.frames[0], args.tiny)
        Path(args.json).write_text(json.dumps(out))
        return 0
    if args.one:
        return _child(args)

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rates = {}
    if not args.tiny and not args.no_rates:
        rates = measure_rates(sorted({video_tokens(f) for f in args.frames}))
        print(json.dumps(rates, indent=1), flush=True)
    results = []
    for frames in args.frames:
        for variant in variants:
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                print(f"budget spent: skipping {variant} {frames}f", flush=True)
                continue
            json_path = args.out / f"train_{variant}_{frames}.json"
            cmd = [sys.executable, __file__, "--one", variant, "--frames", str(frames), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--json", str(json_path)]
            if args.tiny:
                cmd.append("--tiny")
            if args.blocks_to_swap is not None:
                cmd += ["--blocks-to-swap", str(args.blocks_to_swap)]
            print(f"== {variant} at {frames} frames", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT)
            if proc.returncode != 0 or not json_path.exists():
                results.append({"variant": variant, "frames": frames, "ok": False,
                                "error": f"exit code {proc.returncode}"})
            else:
                results.append(json.loads(json_path.read_text()))
            print(f"   ({time.perf_counter() - t0:.0f} s wall)", flush=True)
    parity = None
    if args.parity_frames:
        json_path = args.out / "train_parity.json"
        cmd = [sys.executable, __file__, "--one", "parity", "--frames", str(args.parity_frames), "--json",
               str(json_path)] + (["--tiny"] if args.tiny else [])
        if subprocess.run(cmd, cwd=ROOT).returncode == 0:
            parity = json.loads(json_path.read_text())
    summary = {"rates": rates, "results": results, "parity": parity, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / "train_step.json").write_text(json.dumps(summary, indent=1))
    print_table(results, rates, args.tiny)
    if parity:
        print(f"\nfloat8 parity at {parity['frames']} frames (one step, same batch and noise, vs bf16 weights):")
        for key in ("float8_fwd", "float8_fwd_bwd"):
            print(f"  {key}: loss rel diff {parity[f'loss_rel_diff_{key}']:.2e}, LoRA grad rel err "
                  f"{parity[f'grad_rel_err_{key}']:.3f}, cosine {parity[f'grad_cosine_{key}']:.4f}")
    return 0


def print_table(results: list[dict], rates: dict, tiny: bool) -> None:
    print("\n| variant | frames | s/step | counted TFLOP | TFLOP/s | floor s | peak GPU GiB | host GiB | swapped | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref = {r["frames"]: r.get("seconds_per_step") for r in results if r["variant"] == "reference" and r.get("ok")}
    for r in results:
        if not r.get("ok"):
            print(f"| {r['variant']} | {r['frames']} | - | | | | {r.get('peak_gpu_gib') or ''} | | | "
                  f"FAILED: {r.get('error', '')[:90]} |")
            continue
        floor = ""
        if rates and not tiny:
            recompute = "full" if r["variant"] == "reference" else run_config(VARIANTS[r["variant"]], False
                                                                               ).checkpointing_mode
            fl = count_block_flops(r["tokens"], recompute=recompute)
            key = "fp8_scaled_mm_ffn_rowwise" if VARIANTS.get(r["variant"], {}).get(
                "studio.float8_matmuls") else "bf16_mm_ffn"
            # float8 runs only the forward and recompute linears in float8; the backward stays bf16
            floor_bf16 = floor_seconds(fl, rates, r["tokens"])
            if key != "bf16_mm_ffn":
                fwd_lin = fl.linear_forward + fl.linear_recompute
                floor_bf16 -= fwd_lin / (rates["bf16_mm_ffn"] * 1e12) - fwd_lin / (rates[key] * 1e12)
            floor = f"{floor_bf16:.2f}"
        speedup = ""
        if r["variant"] != "reference" and ref.get(r["frames"]):
            speedup = f"{ref[r['frames']] / r['seconds_per_step']:.2f}x ref"
        print(f"| {r['variant']} | {r['frames']} | {r['seconds_per_step']:.2f} | {r['counted_tflop']:.0f} | "
              f"{r['tflops']:.0f} | {floor} | {r['peak_gpu_gib'] or 0:.1f} | {r['peak_host_gib']:.1f} | "
              f"{r['swapped_blocks']} | {speedup} |")


if __name__ == "__main__":
    raise SystemExit(main())
