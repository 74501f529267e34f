"""Wan 2.2 I2V A14B on the tiny 2.2 kit (CPU): the folder and its family, caching without CLIP, one run training a
LoRA per expert with every t routed to its owner, exact resume, the saved pair in diffusers and in Generate, sweeps
over either expert's strength, and the two-expert ComfyUI graph."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.core import models
from engine.core.families import Wan21I2V, Wan22I2V, family_of
from tests.engine.test_train import REPO, build_trainer, events_of, write_clips, write_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAST_EPOCH = "epoch7"


@pytest.fixture(scope="module")
def project22(tmp_path_factory, tiny_models):
    from engine.core.layout import Project

    project = Project.open(tmp_path_factory.mktemp("wan22") / "proj 2.2 'é'", wan_model=tiny_models.wan22)
    write_clips(project.clips_dir)
    return project


@pytest.fixture(scope="module")
def trained_pair(project22):
    """A finished 2.2 run training both experts (shift 5: both get steps; seed 42 trains high-noise at steps 10 and
    13); returns its run TOML."""
    from engine.training.stages import train

    toml = write_run(project22, "pair", {"max_steps": 14, "epochs": 7, "model.shift": 5.0})
    assert train(toml) == 0
    return toml


def image_file(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ the folder

def test_tiny_22_kit_is_the_hub_layout_and_loads_through_the_loader(tiny_models):
    root = Path(tiny_models.wan22)
    index = json.loads((root / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.9 and index["image_encoder"] == [None, None]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert family_of(root) is Wan22I2V and family_of(tiny_models.wan) is Wan21I2V
    pipe = models.load_wan_pipeline(root)
    assert pipe.transformer.config.image_dim is None and pipe.transformer_2.config.image_dim is None
    assert pipe.image_encoder is None and pipe.config.boundary_ratio == 0.9
    high = models.load_wan_transformer(root, torch.float32, expert="high_noise")
    low = models.load_wan_transformer(root, torch.float32, expert="low_noise")
    assert not torch.equal(high.blocks[0].attn1.to_q.weight, low.blocks[0].attn1.to_q.weight)
    torch.testing.assert_close(low.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)


def test_check_names_the_family_and_the_missing_expert(tiny_models, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "engine.core.models", "check", tiny_models.wan22], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "Wan 2.2 I2V A14B" in ok.stdout
    broken = tmp_path / "wan22"
    shutil.copytree(tiny_models.wan22, broken)
    shutil.rmtree(broken / "transformer_2")
    proc = subprocess.run([sys.executable, "-m", "engine.core.models", "check", str(broken)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "'transformer_2'" in proc.stderr and Wan22I2V.hub_id in proc.stderr


# ------------------------------------------------------------------------------------------------ caching

def test_caching_for_22_has_no_clip_embeddings(project22, tiny_models):
    from engine.training.cache import cache_dataset
    from engine.training.config import load_dataset_config

    toml = write_run(project22, "cache-check")
    dataset = cache_dataset(load_dataset_config(toml.parent / "dataset.toml"), tiny_models.wan22,
                            project22.cache_dir)
    item = dataset.load(0)
    assert set(item) == {"latents", "condition", "text_embeds"}
    assert item["latents"].shape[0] == 16 and item["condition"].shape[0] == 20
    assert item["condition"].shape[1:] == item["latents"].shape[1:]
    assert item["text_embeds"].shape[0] == 512


# ------------------------------------------------------------------------------------------------ training

def test_each_step_trains_the_expert_owning_its_noise_levels(project22):
    """Hooks on both experts record the timesteps they see: high-noise >= 900, low-noise < 900; both train."""
    toml = write_run(project22, "routing", {"max_steps": 12, "epochs": 6, "model.shift": 5.0})
    trainer = build_trainer(toml)
    seen: dict[str, list[float]] = {"high_noise": [], "low_noise": []}
    for slot in trainer.slots:
        slot.trainable.module.register_forward_pre_hook(
            lambda module, args, kwargs, name=slot.name: seen[name].extend(kwargs["timestep"].tolist()),
            with_kwargs=True)
    before = {slot.name: {k: v.clone() for k, v in slot.trainable.lora_state_dict().items()} for slot in trainer.slots}
    assert trainer.run() == 0
    assert seen["high_noise"] and seen["low_noise"], seen
    assert min(seen["high_noise"]) >= 900 and max(seen["low_noise"]) < 900
    for slot in trainer.slots:
        after = slot.trainable.lora_state_dict()
        assert any(not torch.equal(after[k], before[slot.name][k]) for k in after), f"{slot.name} did not train"
    steps = events_of(toml, "step")
    assert {e["expert"] for e in steps} == {"high_noise", "low_noise"}


def test_one_expert_alone_by_min_t(project22):
    from engine.training.stages import train

    toml = write_run(project22, "high-only", {"max_steps": 2, "epochs": 1, "model.min_t": 0.9,
                                              "studio.high_noise_lr": 5e-3})
    assert train(toml) == 0
    files = sorted(p.name for p in (toml.parent / "epoch1").glob("*.safetensors"))
    assert files == ["high_noise_model.safetensors"]
    assert {e["lr"] for e in events_of(toml, "step")} == {5e-3}
    assert any("high-noise expert" in e.get("message", "") and "[0.9, 1)" in e["message"]
               for e in events_of(toml, "log"))


def test_pair_files_per_epoch_in_comfyui_keys(trained_pair):
    from engine.generate.lora_files import load_lora, to_original_module

    epoch = trained_pair.parent / LAST_EPOCH
    high, low = epoch / "high_noise_model.safetensors", epoch / "low_noise_model.safetensors"
    for path, expert in ((high, "high_noise"), (low, "low_noise")):
        state = load_file(str(path))
        assert all(k.startswith("diffusion_model.blocks.") for k in state)
        assert any(".self_attn.q.lora_A.weight" in k for k in state)
        assert not any("k_img" in k for k in state), "Wan 2.2 has no image cross-attention"
        weights = load_lora(path)
        assert weights.metadata["expert"] == expert and weights.metadata["model_family"] == Wan22I2V.key
        assert all(to_original_module(m) for m in weights.modules)
    assert not torch.equal(load_file(str(high))["diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
                           load_file(str(low))["diffusion_model.blocks.0.self_attn.q.lora_B.weight"])


def test_resume_is_exact_for_both_experts(project22, trained_pair):
    """Stopped after 11 steps and resumed, the pair equals the uninterrupted run's pair."""
    from engine.training.stages import train

    toml = write_run(project22, "resumed", {"max_steps": 14, "epochs": 7, "model.shift": 5.0})
    calls = {"n": 0}

    def stop_after_eleven() -> bool:  # between the two high-noise steps
        calls["n"] += 1
        return calls["n"] >= 11

    assert train(toml, should_stop=stop_after_eleven) == 0
    assert max(e["step"] for e in events_of(toml, "step")) == 11
    assert train(toml, resume=True) == 0
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        a, b = load_file(str(trained_pair.parent / LAST_EPOCH / name)), load_file(str(toml.parent / LAST_EPOCH / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------------------ generation

def test_pair_loads_in_diffusers_into_both_transformers(tiny_models, trained_pair):
    from engine.generate.lora_files import load_lora

    pipe = models.load_wan_pipeline(tiny_models.wan22)
    epoch = trained_pair.parent / LAST_EPOCH
    pipe.load_lora_weights(load_lora(epoch / "high_noise_model.safetensors").to_diffusers_peft(), adapter_name="hi")
    pipe.load_lora_weights(load_lora(epoch / "low_noise_model.safetensors").to_diffusers_peft(), adapter_name="lo",
                           load_into_transformer_2=True)
    assert pipe.transformer.peft_config.keys() == {"hi"} and pipe.transformer_2.peft_config.keys() == {"lo"}


def test_generate_with_the_pair_at_separate_strengths(tiny_models, trained_pair, tmp_path):
    from engine.generate.pipeline import PipelineCache, PipelineOptions
    from engine.generate.render import generate, read_sidecar, write_outputs
    from engine.generate.request import GenerationRequest

    pipe = PipelineCache().get(PipelineOptions(model=tiny_models.wan22, device="cpu"))
    epoch = trained_pair.parent / LAST_EPOCH
    high, low = str(epoch / "high_noise_model.safetensors"), str(epoch / "low_noise_model.safetensors")
    base = GenerationRequest(image=str(image_file(tmp_path)), prompt="a red ball bouncing", seed=3, steps=4,
                             frames=5, height=32, width=48, guidance=3.5)

    def render(loras):
        return generate(pipe, GenerationRequest(**{**base.__dict__, "loras": loras})).frames

    plain = render([])
    assert np.array_equal(render([(high, 0.0, "high_noise"), (low, 0.0, "low_noise")]), plain)
    only_low = render([(high, 0.0, "high_noise"), (low, 2.0, "low_noise")])
    both = render([(high, 2.0, "high_noise"), (low, 2.0, "low_noise")])
    assert not np.array_equal(only_low, plain) and not np.array_equal(both, only_low)
    generated = generate(pipe, GenerationRequest(**{**base.__dict__, "loras": [(high, 1.5, "high_noise"),
                                                                             (low, 0.5, "low_noise")]}))
    sidecar = read_sidecar(write_outputs(pipe, generated, tmp_path / "pair.mp4", model=tiny_models.wan22))
    assert [(e["expert"], e["strength"]) for e in sidecar["loras"]] == [("high_noise", 1.5), ("low_noise", 0.5)]
    assert sidecar["boundary_ratio"] == 0.9
    assert [lora[2] for lora in sidecar["request"]["loras"]] == ["high_noise", "low_noise"]


def test_sweep_over_the_low_noise_strength(trained_pair, tmp_path):
    from engine.generate.request import GenerationRequest
    from engine.generate.sweep import plan_sweep

    epoch = trained_pair.parent / LAST_EPOCH
    high, low = str(epoch / "high_noise_model.safetensors"), str(epoch / "low_noise_model.safetensors")
    request = GenerationRequest(image=str(image_file(tmp_path)), prompt="p",
                                loras=[(high, 1.0, "high_noise"), (low, 1.0, "low_noise")])
    variants = plan_sweep(request, [0.0, 0.5, 1.5], swept=1)
    assert [r.loras for _, r in variants] == [[(high, 1.0, "high_noise"), (low, s, "low_noise")]
                                              for s in (0.0, 0.5, 1.5)]
    assert variants[1][0] == "epoch7 low_noise @ 0.5"


def test_comfyui_export_is_the_two_expert_graph(tiny_models, trained_pair, tmp_path):
    from engine.generate.comfyui import boundary_step, comfy_lora_name, export_comfyui_workflow
    from engine.generate.pipeline import PipelineCache, PipelineOptions
    from engine.generate.render import generate, read_sidecar, write_outputs
    from engine.generate.request import GenerationRequest

    pipe = PipelineCache().get(PipelineOptions(model=tiny_models.wan22, device="cpu"))
    epoch = trained_pair.parent / LAST_EPOCH
    high, low = str(epoch / "high_noise_model.safetensors"), str(epoch / "low_noise_model.safetensors")
    request = GenerationRequest(image=str(image_file(tmp_path)), prompt="a ball", seed=5, steps=10, frames=5,
                                height=32, width=48, loras=[(high, 1.25, "high_noise"), (low, 0.75, "low_noise")])
    video = write_outputs(pipe, generate(pipe, request), tmp_path / "pair.mp4", model=tiny_models.wan22)
    workflow = json.loads(export_comfyui_workflow(video).read_text())
    by_type: dict[str, list[dict]] = {}
    for node in workflow.values():
        by_type.setdefault(node["class_type"], []).append(node)
    assert len(by_type["UNETLoader"]) == 2 and "CLIPVisionLoader" not in by_type
    loras = {n["inputs"]["lora_name"]: n["inputs"]["strength_model"] for n in by_type["LoraLoaderModelOnly"]}
    assert loras == {comfy_lora_name(high): 1.25, comfy_lora_name(low): 0.75}
    assert comfy_lora_name(low) == "pair_epoch7_low_noise.safetensors"
    first, second = by_type["KSamplerAdvanced"]
    split = boundary_step(read_sidecar(video)["scheduler"], 10, 0.9)
    assert 0 < split < 10
    assert (first["inputs"]["start_at_step"], first["inputs"]["end_at_step"]) == (0, split)
    assert (second["inputs"]["start_at_step"], second["inputs"]["end_at_step"]) == (split, 10)
    assert first["inputs"]["return_with_leftover_noise"] == "enable" and second["inputs"]["add_noise"] == "disable"
    # the pipeline itself switches at that step: timesteps before it are >= 900
    pipe.scheduler.set_timesteps(10)
    assert int((pipe.scheduler.timesteps >= 900).sum()) == split


# ------------------------------------------------------------------------------------------------ presets and choices

@pytest.mark.parametrize("preset", ["24 GB GPU (low memory)", "48 GB", "80 GB", "CPU demo (tiny model)"])
def test_every_preset_trains_both_experts_of_22_with_its_shift(tiny_models, tmp_path, preset):
    from engine.training.experts import plan_experts
    from engine.training.presets import preset_configs

    run22, _ = preset_configs(preset, clips_dir=tmp_path, output_dir=tmp_path / "r", model_path=tiny_models.wan22)
    run21, _ = preset_configs(preset, clips_dir=tmp_path, output_dir=tmp_path / "r", model_path=tiny_models.wan)
    assert run22.model.shift == Wan22I2V.training_shift == 5.0 and run21.model.shift == 1.0
    plans = plan_experts(run22, Wan22I2V, 0.9)
    assert [(p.expert.name, p.t_range) for p in plans] == [("high_noise", (0.9, 1.0)), ("low_noise", (0.0, 0.9))]


def test_lora_choices_expand_to_entries_and_back(trained_pair, tiny_models, tmp_path):
    from engine.core.layout import RunLayout
    from engine.generate.lora_files import save_lora
    from engine.generate.request import expand_lora_choice, lora_rows_of

    epoch = trained_pair.parent / LAST_EPOCH
    high, low = str(epoch / "high_noise_model.safetensors"), str(epoch / "low_noise_model.safetensors")
    pair = expand_lora_choice(epoch, 1.5, 0.5, two_experts=True)
    assert pair == [(high, 1.5, "high_noise"), (low, 0.5, "low_noise")]
    assert expand_lora_choice(low, 1.5, 0.5, two_experts=True) == [(low, 0.5, "low_noise")]  # its metadata says
    plain = save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 24),
                       "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 2)}, tmp_path / "plain", rank=2, alpha=2)
    both = expand_lora_choice(plain, 1.0, 0.25, two_experts=True)
    assert both == [(str(plain), 1.0, "high_noise"), (str(plain), 0.25, "low_noise")]
    assert expand_lora_choice(plain, 0.75, 0.25, two_experts=False) == [(str(plain), 0.75)]
    assert lora_rows_of([*pair, *both, (str(plain), 0.75)]) == [
        (str(epoch), 1.5, 0.5), (str(plain), 1.0, 0.25), (str(plain), 0.75, 1.0)]
    assert RunLayout(trained_pair.parent).loras()[-1] == (7, epoch)


def test_two_ranks_train_the_pair_as_one_rank_with_twice_the_accumulation(tiny_models, tmp_path_factory):
    """Multi-GPU as for Wan 2.1: both ranks train the same expert at each step (a function of seed and step), each
    expert's gradients are averaged by its own DeepSpeed engine, and the pair equals one rank's with accumulation 2."""
    from engine.core.layout import Project
    from tests.engine.test_distributed import _torchrun

    project = Project.open(tmp_path_factory.mktemp("dist22") / "proj", wan_model=tiny_models.wan22)
    write_clips(project.clips_dir, count=4)
    settings = {"max_steps": 14, "epochs": 100, "optimizer.lr": 5e-3, "model.shift": 5.0, "save_dtype": "float32",
                "save_every_n_epochs": 100, "checkpoint_every_n_epochs": None}
    double = write_run(project, "two ranks", {**settings, "gradient_accumulation_steps": 1})
    result = _torchrun(double)
    assert result.returncode == 0, result.stderr[-3000:]
    single = write_run(project, "one rank", {**settings, "gradient_accumulation_steps": 2})
    assert build_trainer(single).run() == 0
    experts = [e["expert"] for e in events_of(double, "step")]
    assert experts == [e["expert"] for e in events_of(single, "step")] and set(experts) == {"high_noise", "low_noise"}
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        (one,), (two,) = (list(run.parent.glob(f"epoch*/{name}")) for run in (single, double))
        expected, got = load_file(str(one)), load_file(str(two))
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)


def test_diffusion_pipe_export_of_a_pair_run_says_one_run_per_expert(project22, tmp_path):
    """min_t / max_t are diffusion-pipe's own keys, written and read back; the export names the per-expert runs
    diffusion-pipe needs for what the studio trains in one."""
    import tomllib

    from engine.training.config import load_dataset_config, load_run_config
    from engine.training.form import apply_overrides
    from engine.training.interop import export_for_diffusion_pipe

    toml = write_run(project22, "export-pair")
    run, dataset = load_run_config(toml), load_dataset_config(toml.parent / "dataset.toml")
    both = " ".join(export_for_diffusion_pipe(run, dataset, tmp_path / "both").notices)
    assert "high_noise_model'`, min_t = 0.9, max_t = 1" in both and "low_noise_model'`, min_t = 0, max_t = 0.9" in both
    assert "Wan-AI/Wan2.2-I2V-A14B" in both
    high = export_for_diffusion_pipe(apply_overrides(run, {"model.min_t": 0.9}), dataset, tmp_path / "high")
    assert tomllib.loads(high.run_toml.read_text())["model"]["min_t"] == 0.9
    assert load_run_config(high.run_toml).model.min_t == 0.9
    notice = next(n for n in high.notices if "one expert per run" in n)
    assert "trains 1 (high_noise)" in notice and "low_noise_model" not in notice


def test_cli_generates_with_a_run_epoch_as_the_pair(tiny_models, trained_pair, tmp_path):
    epoch = trained_pair.parent / LAST_EPOCH
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", tiny_models.wan22, "--image",
                           str(image_file(tmp_path)), "--prompt", "a ball", "--lora", str(epoch), "--strength", "1.2",
                           "--low-noise-strength", "0.4", "--frames", "5", "--steps", "2", "--height", "16",
                           "--width", "32", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [(e["expert"], e["strength"]) for e in sidecar["loras"]] == [("high_noise", 1.2), ("low_noise", 0.4)]
