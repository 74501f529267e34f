"""The trainable transformer: a peft LoRA on the frozen WanTransformer3DModel with the chosen low-memory modes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.speed.blocks import BlockSwapper, compile_blocks, enable_checkpointing
from engine.speed.float8 import apply_float8_compute, apply_float8_storage
from engine.training.events import TrainingError


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


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config's dtype name means ("bfloat16", "float16", "float32")."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def compute_dtype(run_cfg, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: the config's model.dtype on a GPU, float32 on a CPU (no fast bf16 there)."""
    if device.type != "cuda":
        return torch.float32
    return torch_dtype(run_cfg.model.dtype)


def storage_dtype(run_cfg, device: torch.device) -> torch.dtype:
    """The dtype the base transformer is loaded in (float8 loads at compute dtype, then engine.speed packs)."""
    name = run_cfg.model.transformer_dtype
    if device.type != "cuda" or run_cfg.model.float8:
        return compute_dtype(run_cfg, device)
    return torch_dtype(name)


def prepare_transformer(transformer: torch.nn.Module, run_cfg, device: str | torch.device) -> TrainableTransformer:
    """Freeze `transformer`, add the run's peft LoRA, apply its low-memory/speed modes, place it on `device`.

    LoRA: rank and alpha from the config on every Linear of each block; its weights are initialised from the run's
    seed and kept in float32 whatever `adapter.dtype` says (bf16 master weights lose small AdamW updates without
    Kahan summation). Modes via engine.speed: float8 storage (+ float8 matmuls), block swap, activation
    checkpointing (full / selective / CPU-offloaded), torch.compile.
    """
    from peft import LoraConfig

    from engine.generate.lora_files import PEFT_TARGET_MODULES

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
    if run_cfg.adapter_dtype != "float32":
        notes.append(f"adapter.dtype={run_cfg.adapter_dtype}: LoRA weights are trained in float32 (no Kahan "
                     f"summation here) and saved as {run_cfg.lora_save_dtype}.")

    float8 = run_cfg.model.float8
    swapper = None
    if not run_cfg.blocks_to_swap:
        transformer.to(device)  # before float8: packing is fast on a GPU
    if float8:
        dtype = compute_dtype(run_cfg, device)
        if run_cfg.studio.float8_matmuls:
            report = apply_float8_compute(transformer, compute_dtype=dtype)
        else:
            report = apply_float8_storage(transformer, compute_dtype=dtype)
        matmuls = "float8 matmuls (torch._scaled_mm)" if report.mode == "compute" else \
            f"{str(dtype).removeprefix('torch.')} matmuls"
        notes.append(report.message or f"{report.converted} frozen base Linears stored as float8 e4m3 "
                                       f"({(report.bytes_before - report.bytes_after) / 2**30:.2f} GiB saved), "
                                       f"{matmuls}.")
    if run_cfg.blocks_to_swap:
        # The swapped blocks' weights go to pinned CPU memory before the rest moves, so they never sit on the GPU.
        swapper = BlockSwapper(transformer, run_cfg.blocks_to_swap, device)
        transformer.to(device)
        notes.append(f"Block swap: {run_cfg.blocks_to_swap} blocks live in CPU memory and stream to {device}.")
    if run_cfg.checkpointing_mode:
        enable_checkpointing(transformer, run_cfg.checkpointing_mode)
        notes.append(f"Activation checkpointing: {run_cfg.checkpointing_mode}.")
    if run_cfg.compile:
        compile_blocks(transformer)
        notes.append("Transformer blocks compiled with torch.compile (the first step is slow).")
    transformer.train()
    return TrainableTransformer(transformer, parameters, swapper, notes)
