"""Training building blocks shared by the trainer (engine/train.py) and the GPU benchmark (bench/train_step.py):
the LoRA-wrapped transformer with its low-memory modes, the flow-matching loss, optimizers and LR schedules."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

TEXT_TOKENS = 512  # Wan's attention splits image from text context at 512 text tokens
NUM_TRAIN_TIMESTEPS = 1000


class TrainingError(RuntimeError):
    """A failure to report as an "error" event: `message` says what went wrong, `hint` what to do."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 2):
        super().__init__(message)
        self.hint, self.exit_code = hint, exit_code


@dataclass(frozen=True)
class TimestepSampling:
    """How flow-matching noise levels t in (0, 1) are drawn: logit-normal or uniform, then optionally shifted."""

    method: str = "logit_normal"
    shift: float = 1.0

    @classmethod
    def from_run_config(cls, run_cfg) -> TimestepSampling:
        return cls(run_cfg.model.timestep_sample_method, float(run_cfg.model.shift))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n values of t (float32, on the generator's device)."""
        if self.method == "logit_normal":
            t = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
        elif self.method == "uniform":
            t = torch.rand(n, generator=generator, device=generator.device)
        else:
            raise ValueError(f"timestep_sample_method {self.method!r}: use 'logit_normal' or 'uniform'.")
        if self.shift != 1.0:
            t = t * self.shift / (1 + (self.shift - 1) * t)
        return t


@dataclass
class TrainableTransformer:
    """The LoRA-wrapped transformer, its trainable (float32) LoRA parameters and what was applied to it."""

    module: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    block_swapper: Any = None
    notes: list[str] = field(default_factory=list)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft names without the adapter name (`blocks.0.attn1.to_q.lora_A.weight`), as save_lora takes them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.module)


def compute_dtype(run_cfg, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: the config's model.dtype on a GPU, float32 on a CPU (no fast bf16 there)."""
    if device.type != "cuda":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[run_cfg.model.dtype]


def storage_dtype(run_cfg, device: torch.device) -> torch.dtype:
    """The dtype the base transformer is loaded in (float8 loads at compute dtype, then engine.accel packs)."""
    name = run_cfg.model.transformer_dtype
    if device.type != "cuda" or name == "float8":
        return compute_dtype(run_cfg, device)
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def prepare_transformer(transformer: torch.nn.Module, run_cfg, device: str | torch.device) -> TrainableTransformer:
    """Freeze `transformer`, add the run's peft LoRA, apply its low-memory/speed modes, place it on `device`.

    LoRA: rank and alpha from the config on every Linear of each block; its weights are initialised from the run's
    seed and kept in float32 whatever `adapter.dtype` says (bf16 master weights lose small AdamW updates without
    Kahan summation). Modes via engine.accel: float8 storage (+ float8 matmuls), block swap, activation
    checkpointing (full / selective / CPU-offloaded), torch.compile.
    """
    from peft import LoraConfig

    from engine.lora_io import PEFT_TARGET_MODULES

    device = torch.device(device)
    if run_cfg.blocks_to_swap and not run_cfg.checkpointing_mode:
        raise TrainingError("blocks_to_swap needs activation checkpointing (swapped weights are gone between "
                            "forward and backward).", "Set activation_checkpointing = true or 'unsloth'.")
    notes: list[str] = []
    transformer.requires_grad_(False)
    lora_config = LoraConfig(r=run_cfg.adapter.rank, lora_alpha=run_cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=PEFT_TARGET_MODULES, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # LoRA init from the run's seed, global RNG untouched
        torch.manual_seed(run_cfg.studio.seed)
        transformer.add_adapter(lora_config)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    for p in parameters:
        p.data = p.data.float()
    if run_cfg.adapter.dtype != "float32":
        notes.append(f"adapter.dtype={run_cfg.adapter.dtype}: LoRA weights are trained in float32 (no Kahan "
                     f"summation here) and saved as {run_cfg.save_dtype}.")

    float8 = run_cfg.model.transformer_dtype == "float8"
    needs_accel = float8 or run_cfg.blocks_to_swap or run_cfg.checkpointing_mode or run_cfg.compile
    accel = _import_accel() if needs_accel else None
    swapper = None
    if not run_cfg.blocks_to_swap:
        transformer.to(device)  # before float8: packing is fast on a GPU
    if float8:
        dtype = compute_dtype(run_cfg, device)
        if run_cfg.studio.float8_matmuls:
            report = accel.apply_float8_compute(transformer, compute_dtype=dtype)
        else:
            report = accel.apply_float8_storage(transformer, compute_dtype=dtype)
        matmuls = "float8 matmuls (torch._scaled_mm)" if report.mode == "compute" else \
            f"{str(dtype).removeprefix('torch.')} matmuls"
        notes.append(report.message or f"{report.converted} frozen base Linears stored as float8 e4m3 "
                                       f"({(report.bytes_before - report.bytes_after) / 2**30:.2f} GiB saved), "
                                       f"{matmuls}.")
    if run_cfg.blocks_to_swap:
        # The swapped blocks' weights go to pinned CPU memory before the rest moves, so they never sit on the GPU.
        swapper = accel.BlockSwapper(transformer, run_cfg.blocks_to_swap, device)
        transformer.to(device)
        notes.append(f"Block swap: {run_cfg.blocks_to_swap} blocks live in CPU memory and stream to {device}.")
    if run_cfg.checkpointing_mode:
        accel.enable_checkpointing(transformer, run_cfg.checkpointing_mode)
        notes.append(f"Activation checkpointing: {run_cfg.checkpointing_mode}.")
    if run_cfg.compile:
        accel.compile_blocks(transformer)
        notes.append("Transformer blocks compiled with torch.compile (the first step is slow).")
    transformer.train()
    return TrainableTransformer(transformer, parameters, swapper, notes)


def _import_accel():
    try:
        from engine import accel
    except ImportError as err:
        raise TrainingError(f"The low-memory modes need engine/accel.py, which could not be imported: {err}",
                            "Turn off transformer_dtype float8, blocks_to_swap, activation_checkpointing and "
                            "compile, or update the studio.") from err
    return accel


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, timesteps_cfg: TimestepSampling,
                       generator: torch.Generator, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MSE between the model's velocity and (noise - latents) at a random t, for one batch of cached items.

    x_t = (1 - t) x + t n, model input cat([x_t, mask + condition latents]) on channels, timestep t * 1000, text
    context padded to 512 tokens, CLIP context as `encoder_hidden_states_image`. t and the noise come from
    `generator` (its device), so a seeded generator reproduces a step exactly. Autocast to bf16 on a GPU.
    """
    latents = batch["latents"].float()
    device = latents.device
    if autocast_dtype is None:
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = timesteps_cfg.sample(latents.shape[0], generator).to(device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    t_b = t.view(-1, 1, 1, 1, 1)
    noisy = (1 - t_b) * latents + t_b * noise
    text = batch["text_embeds"]
    if text.shape[1] != TEXT_TOKENS:
        raise ValueError(f"text_embeds must be padded to {TEXT_TOKENS} tokens, got {text.shape[1]}.")
    model_input = torch.cat([noisy, batch["condition"].float()], dim=1)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        prediction = model(hidden_states=model_input, timestep=t * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text,
                           encoder_hidden_states_image=batch["image_embeds"], return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise - latents)


def build_optimizer(parameters: Sequence[torch.nn.Parameter], optimizer_cfg,
                    device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """diffusion-pipe's optimizer name -> our nearest equivalent, and a sentence saying which one was used."""
    kind = optimizer_cfg.type.lower()
    kwargs = dict(lr=optimizer_cfg.lr, betas=tuple(optimizer_cfg.betas), weight_decay=optimizer_cfg.weight_decay,
                  eps=optimizer_cfg.eps)
    if kind in ("adamw8bit", "adamw8bitkahan"):
        kahan = " (its Kahan summation is not available; LoRA weights stay float32 instead)" if "kahan" in kind else ""
        if device.type == "cuda":
            import bitsandbytes as bnb

            return (bnb.optim.AdamW8bit(list(parameters), **kwargs),
                    f"Optimizer {optimizer_cfg.type} -> bitsandbytes AdamW8bit{kahan}.")
        return (torch.optim.AdamW(list(parameters), **kwargs),
                f"Optimizer {optimizer_cfg.type} -> torch AdamW: bitsandbytes' 8-bit states need a CUDA GPU.")
    if kind == "adamw_optimi":
        return (torch.optim.AdamW(list(parameters), **kwargs),
                "Optimizer adamw_optimi -> torch AdamW (optimi is not installed; same update rule).")
    return torch.optim.AdamW(list(parameters), **kwargs), "Optimizer adamw -> torch AdamW."


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler {schedule!r}: use constant, linear or cosine.")


def micro_batch_generator(seed: int, global_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one micro-batch's t and noise: a function of (seed, global micro-batch index) only."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{global_index}".encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(mixed)


def stack_items(samples: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """CachedDataset.load results of one bucket -> a batch with a leading dimension, on `device`."""
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}


