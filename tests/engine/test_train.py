"""Trainer tests on the tiny Wan kit (CPU): the objective, overfitting, exact resume, the saved LoRA in diffusers,
the low-memory modes switched on, diffusion-pipe configs, events and the errors people hit."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.files import read_jsonl
from engine.training.config import load_run_config, save_dataset_config, save_run_config
from engine.training.form import apply_overrides
from engine.training.presets import preset_configs

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CAPTIONS = ("a red ball bouncing fast, dynamic motion", "blue stripes panning slowly, static camera")


# ------------------------------------------------------------------------------------------------ helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_clips(clips_dir: Path, count: int = 2, frames: int = 17, size: int = 64) -> None:
    """Short 16 fps clips with different motion, each with its caption."""
    from engine.core.ffmpeg import write_video

    clips_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(count):
        video = []
        for f in range(frames):
            if c % 2 == 0:
                cx, cy = 8 + (f * 3 + c * 7) % (size - 16), size // 2  # each clip its own phase
                img = np.stack([40 + 0 * xx, 30 + yy, 120 + 0 * xx], -1).astype(np.uint8)
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < 49] = (250, 200, 40)
            else:
                stripes = ((xx + yy + f * 2 + c * 3) // 8) % 2
                img = np.stack([60 + 150 * stripes, 90 + 0 * xx, 200 - 120 * stripes], -1).astype(np.uint8)
            video.append(img)
        write_video(video, clips_dir / f"clip {c}.mp4", fps=16)
        (clips_dir / f"clip {c}.txt").write_text(CAPTIONS[c % 2], encoding="utf-8")


def write_run(project, name: str, overrides: dict | None = None) -> Path:
    """The CPU demo preset on the project's clips, with overrides; returns the run TOML path."""
    run_dir = project.run_dir(name)
    run, dataset = preset_configs("CPU demo (tiny model)", clips_dir=project.clips_dir, output_dir=run_dir,
                                  model_path=project.settings().wan_model)
    run = apply_overrides(run, {"studio.samples.epochs": [], "warmup_steps": 0, **(overrides or {})})
    run_dir.mkdir(parents=True, exist_ok=True)
    save_dataset_config(dataset, run_dir / "dataset.toml")
    save_run_config(run, run_dir / "run.toml")
    return run_dir / "run.toml"


def events_of(run_toml: Path, event: str | None = None) -> list[dict]:
    records = read_jsonl(load_run_config(run_toml).output_path() / "metrics.jsonl")
    return [r for r in records if event is None or r["event"] == event]


def saved_lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def run_cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.training", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def eval_loss(module, dataset, timesteps) -> float:
    """Loss over every item with fixed t and noise: comparable before and after training."""
    from engine.training.objective import flow_matching_loss, micro_batch_generator, stack_items

    with torch.no_grad():
        losses = [flow_matching_loss(module, stack_items([dataset.load(i)], torch.device("cpu")),
                                     timesteps_cfg=timesteps, generator=micro_batch_generator(123, k))
                  for k in range(4) for i in range(len(dataset.items))]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def train_project(tmp_path_factory, tiny_models):
    from engine.core.layout import Project

    project = Project.open(tmp_path_factory.mktemp("train") / "proj 'é'", wan_model=tiny_models.wan)
    write_clips(project.clips_dir)
    return project


def build_trainer(run_toml: Path):
    """A Trainer on the cached dataset, in this process (as engine.training.train builds it)."""
    from engine.core.layout import RunLayout
    from engine.core.models import load_wan_transformer
    from engine.training.events import EventLog
    from engine.training.loop import Trainer
    from engine.training.model import storage_dtype
    from engine.training.parallel import World
    from engine.training.stages import cache, load_configs, validate

    run_cfg, dataset_cfg = load_configs(run_toml)
    layout = RunLayout(run_cfg.output_path())
    world, device = World(), torch.device("cpu")
    events = EventLog(layout, world)
    report = validate(run_cfg, dataset_cfg, events)
    dataset = cache(run_cfg, dataset_cfg, report, layout, world, device, events, lambda: False)
    trainer = Trainer(run_cfg, dataset, world=world, device=device, events=events, should_stop=lambda: False,
                      layout=layout)
    trainer.build([load_wan_transformer(run_cfg.model.ckpt_path, storage_dtype(run_cfg, device),
                                        expert=plan.expert.name) for plan in trainer.plans], None)
    return trainer


# ------------------------------------------------------------------------------------------ building blocks

def test_timestep_shift():  # the learning-rate schedules: tests/engine/test_interop.py, against torch's schedulers
    from engine.training.objective import TimestepSampling

    gen = torch.Generator().manual_seed(0)
    plain = TimestepSampling("logit_normal", 1.0).sample(4000, gen)
    shifted = TimestepSampling("logit_normal", 3.0).sample(4000, torch.Generator().manual_seed(0))
    assert 0 < plain.min() and plain.max() < 1 and abs(float(plain.mean()) - 0.5) < 0.02
    assert torch.allclose(shifted, plain * 3 / (1 + 2 * plain))  # same draws, shifted towards noise
    uniform = TimestepSampling("uniform").sample(4000, gen)
    assert abs(float(uniform.std()) - (1 / 12) ** 0.5) < 0.02


def test_flow_matching_loss_is_the_documented_objective(train_project):
    """The loss equals MSE(model(cat[x_t, cond], t*1000, text, image), n - x) computed by hand."""
    from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator

    trainer = build_trainer(write_run(train_project, "objective"))
    model = trainer.trainable.module
    batch = {k: v.unsqueeze(0) for k, v in trainer.dataset.load(0).items()}
    assert batch["text_embeds"].shape[1] == 512 and batch["condition"].shape[1] == 20
    sampling = TimestepSampling("logit_normal", 2.0)
    with torch.no_grad():
        loss = flow_matching_loss(model, batch, timesteps_cfg=sampling, generator=micro_batch_generator(1, 5))
        gen = micro_batch_generator(1, 5)
        t = sampling.sample(1, gen)
        noise = torch.randn(batch["latents"].shape, generator=gen)
        x = batch["latents"]
        x_t = (1 - t) * x + t * noise
        pred = model(hidden_states=torch.cat([x_t, batch["condition"]], 1), timestep=t * 1000,
                     encoder_hidden_states=batch["text_embeds"], encoder_hidden_states_image=batch["image_embeds"],
                     return_dict=False)[0]
    assert float(loss) == pytest.approx(float(((pred - (noise - x)) ** 2).mean()), rel=1e-5)


def test_lora_targets_every_block_linear(train_project):
    from engine.generate.lora_files import wan_module_names

    trainer = build_trainer(write_run(train_project, "targets"))
    state = trainer.trainable.lora_state_dict()
    wrapped = {k.rsplit(".lora_", 1)[0] for k in state}
    blocks = trainer.trainable.module.config.num_layers
    assert len(wrapped) == 12 * blocks
    assert {w.split(".", 2)[2] for w in wrapped} == set(wan_module_names().values())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.trainable.parameters)
    assert all(not p.requires_grad for n, p in trainer.trainable.module.named_parameters() if "lora_" not in n)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    assert ranks == {4}  # CPU demo preset rank


# ------------------------------------------------------------------------------------------------ training

def test_loss_falls_when_overfitting_two_clips(train_project):
    run_toml = write_run(train_project, "overfit", {"max_steps": 40, "epochs": 100, "optimizer.lr": 1e-2,
                                                    "save_every_n_epochs": 50, "checkpoint_every_n_epochs": None})
    trainer = build_trainer(run_toml)
    assert len(trainer.dataset.items) == 2
    before = eval_loss(trainer.trainable.module, trainer.dataset, trainer.timesteps)
    assert trainer.run() == 0
    after = eval_loss(trainer.trainable.module, trainer.dataset, trainer.timesteps)
    assert after < 0.8 * before, (before, after)
    steps = events_of(run_toml, "step")
    assert [e["step"] for e in steps] == list(range(1, 41))
    for e in steps:
        assert {"time", "max_steps", "epoch", "loss", "lr", "steps_per_s", "eta_s", "gpu_mem_gib"} <= set(e)
        assert e["max_steps"] == 40 and np.isfinite(e["loss"]) and e["gpu_mem_gib"] is None
    assert steps[-1]["epoch"] == 20  # 2 clips, batch 1: 2 steps per epoch
    saves = events_of(run_toml, "save")
    assert [(s["kind"], s["epoch"]) for s in saves] == [("lora", 20), ("state", 21)]
    assert Path(saves[0]["path"]).name == "adapter_model.safetensors"
    assert list((run_toml.parent / "tb").glob("events.out.tfevents.*"))
    assert events_of(run_toml, "phase")[-1]["phase"] == "done"


def _final_lora(run_toml: Path) -> dict[str, torch.Tensor]:
    epoch_dirs = sorted(run_toml.parent.glob("epoch*"), key=lambda p: int(p.name[5:]))
    return saved_lora(epoch_dirs[-1])


def test_killed_and_resumed_run_equals_uninterrupted(train_project):
    """SIGKILL mid-run, resume, SIGTERM (graceful), resume again: same LoRA and loss curve as one straight run."""
    settings = {"max_steps": 24, "epochs": 100, "gradient_accumulation_steps": 2, "optimizer.lr": 2e-3,
                "warmup_steps": 3, "lr_scheduler": "linear", "studio.cosine_schedule": True,
                "studio.state_every_n_steps": 4, "model.shift": 2.0, "save_every_n_epochs": 100,
                "save_dtype": "float32"}
    straight = write_run(train_project, "straight", settings)
    assert build_trainer(straight).run() == 0

    broken = write_run(train_project, "broken", settings)
    child = run_cli(["--config", str(broken)])
    for line in child.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "step" and event["step"] == 6:  # between the states of steps 4 and 8
            child.send_signal(signal.SIGKILL)
            break
    child.wait(60)
    assert child.returncode == -signal.SIGKILL
    assert "done" not in [e["phase"] for e in events_of(broken, "phase")], "the run ended before it was killed"
    states = sorted(p.name for p in (broken.parent / "state").iterdir())
    assert states and all(not name.startswith(".") for name in states)  # no half-written state left behind

    child = run_cli(["--config", str(broken), "--resume"])
    for line in child.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "step" and event["step"] >= 14:
            child.send_signal(signal.SIGTERM)
            break
    assert child.wait(60) == 0
    assert events_of(broken, "phase")[-1]["phase"] == "stopped"
    stopped_at = events_of(broken, "save")[-1]
    assert stopped_at["kind"] == "state" and 14 <= stopped_at["step"] < 24

    from engine.training.stages import train

    assert train(broken, resume=True) == 0  # the last leg in this process (saves a start-up)
    assert events_of(broken, "phase")[-1]["phase"] == "done"

    expected, got = _final_lora(straight), _final_lora(broken)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # it did learn
    # The loss of each step (the last one logged for it) matches the straight run.
    straight_loss = {e["step"]: e["loss"] for e in events_of(straight, "step")}
    broken_loss = {e["step"]: e["loss"] for e in events_of(broken, "step")}
    assert broken_loss.keys() == straight_loss.keys()
    for step, loss in straight_loss.items():
        assert broken_loss[step] == pytest.approx(loss, rel=1e-4)
    for state_dir in (broken.parent / "state").iterdir():  # safetensors + json only: nothing to unpickle
        assert {p.suffix for p in state_dir.iterdir()} <= {".safetensors", ".json"}


def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(train_project):
    """Every key maps to an original Wan module; diffusers' load_lora_weights reproduces the trained model."""
    from engine.core.models import load_wan_pipeline
    from engine.generate.lora_files import check_keys_match_model, wan_module_names

    run_toml = write_run(train_project, "export", {"max_steps": 8, "epochs": 100, "optimizer.lr": 1e-2,
                                                   "save_dtype": "float32", "studio.samples.epochs": [2],
                                                   "studio.samples.frames": 5, "studio.samples.steps": 2})
    trainer = build_trainer(run_toml)
    assert trainer.run() == 0
    sample = events_of(run_toml, "sample")  # rendered with the in-memory LoRA after epoch 2
    assert [(e["epoch"], e["step"]) for e in sample] == [(2, 4)] and Path(sample[0]["path"]).stat().st_size > 0
    assert trainer.trainable.module.training  # back in train mode for the steps after the sample
    lora_dir = Path([e for e in events_of(run_toml, "save") if e["kind"] == "lora"][-1]["path"]).parent
    assert lora_dir.name == "epoch4"
    state = saved_lora(lora_dir)
    original_names = set(wan_module_names())
    blocks = trainer.trainable.module.config.num_layers
    for key in state:
        prefix, block, rest = key.split(".", 3)[0], key.split(".")[2], key.split(".", 3)[3]
        module, kind = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        assert prefix == "diffusion_model" and key.split(".")[1] == "blocks" and 0 <= int(block) < blocks
        assert module in original_names and kind in ("lora_A", "lora_B"), key
    assert len(state) == 2 * 12 * blocks
    pipe = load_wan_pipeline(train_project.settings().wan_model)
    check_keys_match_model(state, pipe.transformer)

    batch = {k: v.unsqueeze(0) for k, v in trainer.dataset.load(0).items()}
    inputs = dict(hidden_states=torch.cat([batch["latents"], batch["condition"]], 1), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=batch["text_embeds"], encoder_hidden_states_image=batch["image_embeds"],
                  return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(lora_dir / "adapter_model.safetensors"), adapter_name="style")
        with_lora = pipe.transformer(**inputs)[0]
        trained = trainer.trainable.module.eval()(**inputs)[0]
    assert (with_lora - base).abs().max() > 1e-4  # the LoRA changes the output ...
    torch.testing.assert_close(with_lora, trained, rtol=1e-4, atol=1e-5)  # ... exactly as it did in training
    image = np.full((16, 16, 3), 128, np.uint8)
    from PIL import Image

    def video(scale: float) -> np.ndarray:
        pipe.set_adapters("style", scale)
        return pipe(image=Image.fromarray(image), prompt="a red ball", height=16, width=16, num_frames=5,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    assert np.abs(video(1.0) - video(0.0)).max() > 1e-4

    # A new run may start from this LoRA (diffusion-pipe's init_from_existing): same weights, same output.
    again = build_trainer(write_run(train_project, "continued", {"adapter.init_from_existing": str(lora_dir)}))
    with torch.no_grad():
        torch.testing.assert_close(again.trainable.module.eval()(**inputs)[0], trained, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- modes, configs

def test_low_memory_modes_switched_on(train_project):
    """float8 storage, CPU-offloaded checkpointing, block swap and the 8-bit optimizer name all run together."""
    run_toml = write_run(train_project, "lowmem", {
        "max_steps": 3, "model.transformer_dtype": "float8", "activation_checkpointing": "unsloth",
        "blocks_to_swap": 1, "optimizer.type": "AdamW8bitKahan"})
    trainer = build_trainer(run_toml)
    assert trainer.trainable.block_swapper is not None
    assert trainer.run() == 0
    losses = [e["loss"] for e in events_of(run_toml, "step")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    notes = " ".join(e["message"] for e in events_of(run_toml, "log"))
    assert "float8" in notes and "Block swap" in notes and "offload" in notes
    assert "AdamW8bitKahan -> torch AdamW" in notes and "CUDA" in notes
    assert any(float(v.abs().max()) > 0 for k, v in _final_lora(run_toml).items() if "lora_B" in k)


@pytest.mark.parametrize("fixture", ["min_vram.toml", "studio_extras.toml"])
def test_diffusion_pipe_example_configs_accepted(train_project, fixture, tmp_path):
    """diffusion-pipe's files load; on the tiny model (2 blocks) with its own model path, one step trains."""
    from engine.training.interop import notices
    from engine.training.model import prepare_transformer
    from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator
    from engine.training.optim import build_optimizer
    from engine.training.stages import load_configs

    run_cfg, dataset_cfg = load_configs(FIXTURES / fixture)
    assert dataset_cfg.directory and run_cfg.adapter.rank in (16, 32)
    unused = " ".join(notices(run_cfg))  # keys we read but do not act on are named, not dropped silently
    assert ("eval_every_n_epochs" in unused and "partition_method" in unused) == (fixture == "min_vram.toml")
    _, note = build_optimizer([torch.nn.Parameter(torch.zeros(2))], run_cfg.optimizer, torch.device("cpu"))
    assert run_cfg.optimizer.type in note
    run_cfg = apply_overrides(run_cfg, {"model.ckpt_path": train_project.settings().wan_model,
                                        "blocks_to_swap": min(run_cfg.blocks_to_swap, 1), "compile": False})
    from engine.core.models import load_wan_transformer

    trainable = prepare_transformer(load_wan_transformer(run_cfg.model.ckpt_path, torch.float32), run_cfg, "cpu")
    shapes = {"latents": (1, 16, 2, 4, 4), "condition": (1, 20, 2, 4, 4), "image_embeds": (1, 17, 8),
              "text_embeds": (1, 512, 32)}
    batch = {k: torch.randn(s) for k, s in shapes.items()}
    loss = flow_matching_loss(trainable.module, batch, timesteps_cfg=TimestepSampling.from_run_config(run_cfg),
                              generator=micro_batch_generator(0, 0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters)


# ------------------------------------------------------------------------------------------------- errors

def test_errors_are_reported_as_events(train_project, tmp_path, monkeypatch, capsys):
    import engine.training.loop as train_module
    from engine.core.layout import Project
    from engine.training.stages import train
    from engine.training.state import save_training_state

    missing_model = write_run(train_project, "no model", {"model.ckpt_path": str(tmp_path / "nowhere")})
    assert train(missing_model) == 2
    error = events_of(missing_model, "error")[-1]
    assert "not found" in error["message"] and "ckpt_path" in error["hint"]
    assert events_of(missing_model, "phase")[-1]["phase"] == "error"

    bad_key = tmp_path / "bad.toml"
    bad_key.write_text(missing_model.read_text(encoding="utf-8") + "\nmystery_option = 3\n", encoding="utf-8")
    assert train(bad_key) == 2  # the config is unreadable: the error still reaches stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed[-2]["event"] == "error" and "mystery_option" in printed[-2]["message"]

    empty = Project.open(tmp_path / "empty", wan_model=train_project.settings().wan_model)
    empty_run = write_run(empty, "run")
    assert train(empty_run) == 2
    assert "no video clips" in events_of(empty_run, "error")[-1]["message"]

    full = write_run(train_project, "disk full", {"max_steps": 4, "studio.state_every_n_steps": 2})

    def no_space(*args, **kwargs):
        if int(events_of(full, "step")[-1]["step"]) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    real_save = save_training_state
    monkeypatch.setattr(train_module, "save_training_state", no_space)
    assert train(full) == 3
    error = events_of(full, "error")[-1]
    assert "disk is full" in error["message"] and "resume" in error["hint"]
    assert [p.name for p in (full.parent / "state").iterdir()] == ["step2"]  # the last good state is intact

    oom = write_run(train_project, "oom", {"max_steps": 2})

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module, "flow_matching_loss", out_of_memory)
    assert train(oom) == 2
    error = events_of(oom, "error")[-1]
    assert "out of memory" in error["message"]
    assert "transformer_dtype = 'float8'" in error["hint"] and "blocks_to_swap" in error["hint"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {"event": "error"}.items() <= printed[-2].items()  # stdout carries the same events


def test_diffusion_pipe_save_cadence_in_examples_and_optimizers_the_studio_lacks(train_project):
    """save_every_n_examples saves every N // global batch steps (diffusion-pipe's train.py); an optimizer only
    diffusion-pipe has, or no lr, is refused before anything is cached or loaded, naming the key and what to set."""
    from engine.training.stages import train

    run_toml = write_run(train_project, "examples", {"max_steps": 4, "epochs": 100, "save_every_n_epochs": None,
                                                     "checkpoint_every_n_epochs": None, "save_every_n_examples": 2,
                                                     "gradient_accumulation_steps": 1, "save_dtype": None,
                                                     "adapter.dtype": "float16"})
    assert build_trainer(run_toml).run() == 0
    saved = [Path(e["path"]).parent.name for e in events_of(run_toml, "save") if e["kind"] == "lora"]
    assert saved == ["step2", "epoch2", "step4"]  # every 2 clips at batch 1, and the last LoRA
    # without save_dtype a LoRA is saved in the adapter's dtype, as diffusion-pipe's saver does
    assert {v.dtype for v in saved_lora(run_toml.parent / "step4").values()} == {torch.float16}

    prodigy = write_run(train_project, "prodigy", {"optimizer.type": "Prodigy", "optimizer.lr": 1.0})
    assert train(prodigy) == 2
    error = events_of(prodigy, "error")[-1]
    assert "optimizer.type = 'Prodigy'" in error["message"] and "adamw_optimi" in error["hint"]
    assert [e["phase"] for e in events_of(prodigy, "phase")] == ["validate", "error"]
    no_lr = write_run(train_project, "no lr")  # diffusion-pipe would use the optimizer's own default
    text = no_lr.read_text(encoding="utf-8")
    no_lr.write_text("\n".join(line for line in text.splitlines() if not line.startswith("lr =")), encoding="utf-8")
    assert train(no_lr) == 2 and "[optimizer] lr is not set" in events_of(no_lr, "error")[-1]["message"]


def test_memory_hint_skips_settings_in_use():
    from engine.training.loop import memory_hint
    from engine.training.schema import RunConfig

    low = apply_overrides(RunConfig(), {"model.transformer_dtype": "float8", "activation_checkpointing": "unsloth",
                                        "blocks_to_swap": 39})
    hint = memory_hint(low, (81, 480, 832))
    assert "float8" not in hint and "blocks_to_swap" not in hint
    assert "frame_buckets = [33]" in hint and "81" in hint and "resolutions" in hint


def test_stop_request_saves_state_and_fresh_start_keeps_old_states(train_project):
    from engine.training.stages import train

    run_toml = write_run(train_project, "stop early", {"max_steps": 10, "epochs": 100})

    def once_training() -> bool:  # stop as soon as training starts (not while caching, which would keep no step)
        return any(e["phase"] == "train" for e in events_of(run_toml, "phase"))

    assert train(run_toml, should_stop=once_training) == 0  # stop asked at once: one step, its state, "stopped"
    assert [e["step"] for e in events_of(run_toml, "step")] == [1]
    assert events_of(run_toml, "phase")[-1]["phase"] == "stopped"
    assert [p.name for p in (run_toml.parent / "state").iterdir()] == ["step1"]
    assert train(run_toml, should_stop=once_training) == 0  # a fresh start (no --resume) ...
    moved = list(run_toml.parent.glob("state.before-*"))
    assert len(moved) == 1 and (moved[0] / "step1" / "state.json").exists()  # ... moves the old state aside
    assert train(run_toml, resume=True, should_stop=once_training) == 0
    assert events_of(run_toml, "step")[-1]["step"] == 2  # resumed from the new run's step 1


def test_optimizer_state_round_trip_without_pickles(tmp_path):
    from engine.training.state import TrainingState, capture_rng_state, load_training_state, save_training_state

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sum(p.sum() ** 2 for p in params).backward()
    optimizer.step()
    state = TrainingState(step=7, epoch=3, global_micro_batches=14, lora={"a": params[0].detach()},
                          optimizer=optimizer.state_dict(), rng=capture_rng_state(), info={"seed": 1})
    for step in (7, 8, 9):
        state.step = step
        saved = save_training_state(tmp_path, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step8", "step9"] and saved.name == "step9"
    loaded = load_training_state(saved)
    assert loaded.step == 9 and loaded.global_micro_batches == 14 and loaded.info == {"seed": 1}
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    restored.load_state_dict(loaded.optimizer)
    original = optimizer.state_dict()
    assert restored.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)
    for index, values in original["state"].items():
        for name, tensor in values.items():
            torch.testing.assert_close(restored.state_dict()["state"][index][name], tensor)


def test_block_swap_runs_ask_for_expandable_segments(tmp_path, monkeypatch):
    from engine.training.__main__ import _prefer_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    config = FIXTURES / "min_vram.toml"  # blocks_to_swap = 32
    _prefer_expandable_segments(config)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    _prefer_expandable_segments(tmp_path / "missing.toml")  # a broken config is train()'s to report
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_a_stop_request_file_stops_the_run_and_an_old_one_is_ignored(train_project):
    from engine.core.layout import RunLayout
    from engine.training.stages import train

    run_toml = write_run(train_project, "stop by file", {"max_steps": 3, "epochs": 100})
    request = RunLayout(run_toml.parent).stop_request_file
    request.write_text("{}")  # left over from an earlier stop: must not stop the next run
    assert train(run_toml) == 0
    assert events_of(run_toml, "phase")[-1]["phase"] == "done"

    def request_after_first_step() -> bool:
        if events_of(run_toml, "step") and not request.exists():
            request.write_text("{}")
        return False

    request.unlink()
    assert train(run_toml, resume=False, should_stop=request_after_first_step) == 0
    assert events_of(run_toml, "phase")[-1]["phase"] == "stopped"
    assert events_of(run_toml, "step")[-1]["step"] < 3
