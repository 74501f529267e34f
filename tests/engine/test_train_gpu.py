"""The trainer end to end on a CUDA GPU with the tiny kit (skipped without one): bf16 autocast, bitsandbytes'
8-bit AdamW through a stop and resume, and the low-memory modes on the GPU.

    python -m pytest -q tests/engine/test_train_gpu.py      # on a GPU machine
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.test_train import events_of, saved_lora, write_clips, write_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = {"model.dtype": "bfloat16", "model.transformer_dtype": "bfloat16", "epochs": 100, "optimizer.lr": 2e-3,
       "checkpoint_every_n_epochs": None, "save_every_n_epochs": 100, "save_dtype": "float32"}


@pytest.fixture(scope="module")
def gpu_project(tmp_path_factory, tiny_models):
    from engine.core.layout import Project

    project = Project.open(tmp_path_factory.mktemp("gpu") / "proj", wan_model=tiny_models.wan)
    write_clips(project.clips_dir)
    return project


def _final(run_toml):
    return saved_lora(sorted(run_toml.parent.glob("epoch*"), key=lambda p: int(p.name[5:]))[-1])


def test_8bit_adamw_stop_and_resume_on_gpu(gpu_project):
    from engine.training.stages import train

    settings = {**GPU, "max_steps": 6, "optimizer.type": "adamw8bit", "studio.state_every_n_steps": 2}
    straight = write_run(gpu_project, "straight", settings)
    assert train(straight) == 0
    notes = " ".join(e["message"] for e in events_of(straight, "log"))
    assert "bitsandbytes AdamW8bit" in notes
    steps = events_of(straight, "step")
    assert all(e["gpu_mem_gib"] > 0 and np.isfinite(e["loss"]) for e in steps)

    stopped = write_run(gpu_project, "stopped", settings)
    assert train(stopped, should_stop=lambda: len(events_of(stopped, "step")) >= 3) == 0
    assert events_of(stopped, "phase")[-1]["phase"] == "stopped"
    assert train(stopped, resume=True) == 0
    expected, got = _final(straight), _final(stopped)
    for key in expected:  # the 8-bit optimizer state survives the safetensors round trip exactly
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-5)


def test_low_memory_modes_on_gpu(gpu_project):
    from engine.training.stages import train

    for name, extra in {
        "lowmem": {"model.transformer_dtype": "float8", "blocks_to_swap": 1, "activation_checkpointing": "unsloth",
                   "optimizer.type": "AdamW8bitKahan"},
        "selective": {"activation_checkpointing": True, "studio.selective_checkpointing": True},
        "fp8 matmuls": {"model.transformer_dtype": "float8", "studio.float8_matmuls": True,
                        "activation_checkpointing": True},
    }.items():
        run_toml = write_run(gpu_project, name, {**GPU, "max_steps": 3, **extra})
        assert train(run_toml) == 0, events_of(run_toml, "error")
        losses = [e["loss"] for e in events_of(run_toml, "step")]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert any(float(v.abs().max()) > 0 for k, v in _final(run_toml).items() if "lora_B" in k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_under_the_deepspeed_launcher_equal_one_gpu(gpu_project):
    """`deepspeed --num_gpus 2 --module engine.training` (NCCL) == one GPU with twice the gradient accumulation."""
    import os
    import subprocess
    import sys

    from engine.training.stages import train
    from tests.engine.test_train import REPO

    settings = {**GPU, "max_steps": 4, "optimizer.type": "adamw8bit", "gradient_clipping": 0.05}
    single = write_run(gpu_project, "one gpu", {**settings, "gradient_accumulation_steps": 2})
    assert train(single) == 0
    double = write_run(gpu_project, "two gpus", {**settings, "gradient_accumulation_steps": 1})
    result = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29533",
         "--module", "engine.training", "--config", str(double)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert [e["step"] for e in events_of(double, "step")] == [1, 2, 3, 4]  # one writer
    one = {e["step"]: e["loss"] for e in events_of(single, "step")}
    for e in events_of(double, "step"):
        assert e["loss"] == pytest.approx(one[e["step"]], rel=2e-3)
    expected, got = _final(single), _final(double)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=2e-3, atol=2e-5)
