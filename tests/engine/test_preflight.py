"""Before a run: the preset for the machine, the dataset check, and the estimate of steps, time and disk.
(That the preflight's step count is the trainer's, on 1 and 2 ranks, is checked in test_distributed.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.core.hardware import GpuInfo
from engine.training.presets import PRESET_24GB, PRESET_48GB, PRESET_80GB, PRESET_CPU_DEMO, preset_configs


def test_preflight_on_the_demo_project(demo_home, tmp_path):
    from engine.core.layout import Project
    from engine.training.check import preflight

    project = Project(shutil.copytree(demo_home / "demo", tmp_path / "demo"))  # the session's demo stays as it is
    clips = project.list_clips()
    assert len(clips) >= 2
    run, dataset = preset_configs(PRESET_CPU_DEMO, clips_dir=project.clips_dir, output_dir=".",
                                  model_path=project.settings().wan_model)
    check = preflight(run, dataset, measured_steps_per_s=2.0)
    assert check.errors == [] and check.ok
    steps_per_epoch = len(clips)  # one 17-frame bucket per clip, batch 1
    estimate = check.estimate()
    assert f"{steps_per_epoch} steps per epoch" in estimate
    assert f"{steps_per_epoch * run.epochs} steps" in estimate
    assert "Time per epoch" in estimate and "each LoRA" in estimate
    assert check.epoch_s == pytest.approx(steps_per_epoch / 2.0)

    caption = clips[0].with_suffix(".txt")
    caption.unlink()
    errors = preflight(run, dataset).errors
    assert any(clips[0].name in e and "caption" in e for e in errors)  # a missing caption blocks the run


def test_the_preset_follows_the_model_and_the_smallest_gpu(tmp_path, tiny_models):
    from engine.training.presets import recommended_preset

    wan14b = tmp_path / "Wan2.1-I2V-14B-480P-Diffusers"
    (wan14b / "transformer").mkdir(parents=True)
    (wan14b / "transformer" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}))
    gpu = lambda gib: GpuInfo(0, "GPU", gib)  # noqa: E731
    assert recommended_preset(str(wan14b), []) == PRESET_CPU_DEMO  # no GPU
    assert recommended_preset(str(wan14b), [gpu(23.6)]) == PRESET_24GB
    assert recommended_preset(str(wan14b), [gpu(79.1), gpu(44.5)]) == PRESET_48GB  # the smallest GPU decides
    assert recommended_preset(str(wan14b), [gpu(139.8)]) == PRESET_80GB
    assert recommended_preset("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", [gpu(79.1)]) == PRESET_80GB  # a hub id
    assert recommended_preset(tiny_models.wan, [gpu(79.1)]) == PRESET_CPU_DEMO  # a tiny model on any machine


def test_lora_size_estimate_matches_the_lora_the_trainer_saves(tiny_models, tmp_path):
    from engine.core.models import load_wan_transformer
    from engine.training.check import lora_size_bytes
    from engine.training.model import prepare_transformer

    run, _ = preset_configs(PRESET_CPU_DEMO, clips_dir=tmp_path, output_dir=tmp_path, model_path=tiny_models.wan)
    trainable = prepare_transformer(load_wan_transformer(tiny_models.wan, torch.float32), run, "cpu")
    values = sum(t.numel() for t in trainable.lora_state_dict().values())
    assert lora_size_bytes(tiny_models.wan, run.adapter.rank, 2) == values * 2
    assert lora_size_bytes("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 32) is None  # no local config to count from
