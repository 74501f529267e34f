"""Generation on the tiny kit: videos, LoRA strengths, formats, sweeps, reproduction, bad input, trainer samples."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.infer import (
    GenerationCancelled, GenerationError, GenerationRequest, PipelineCache, PipelineOptions, comfyui_workflow,
    export_comfyui_workflow, fit_size, motion_score, open_image, plan_sweep, read_sidecar, render_sweep,
    render_video, reproduce, request_from_sidecar, resolve_request, sample_with_transformer,
)
from engine.lora_io import LoraMismatchError, load_lora, save_lora, save_lora_file
from tests.engine.test_lora_io import make_lora_dir, random_peft_lora

SMALL = dict(prompt="a warrior jumps", seed=7, steps=2, frames=9, height=16, width=32)  # small: the VAE dominates


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "start frame.png"
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(64, 96, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def cache(tiny_models):
    cache = PipelineCache()
    cache.get(PipelineOptions(model=tiny_models.wan, device="cpu"))
    yield cache
    cache.unload()


@pytest.fixture(scope="module")
def pipe(cache):
    return cache.pipe


@pytest.fixture(scope="module")
def lora_file(tiny_models, tmp_path_factory):
    return make_lora_dir(tiny_models.wan, tmp_path_factory.mktemp("runs") / "run-a" / "epoch1", seed=1)


def request(image_path, **overrides) -> GenerationRequest:
    return GenerationRequest(image=str(image_path), **{**SMALL, **overrides})


def video_frames(path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    return np.stack(frames)


def test_generates_a_video_with_a_complete_sidecar(pipe, image_path, lora_file, tmp_path):
    steps_seen = []
    out = render_video(pipe, request(image_path, loras=[(str(lora_file), 0.8)]), tmp_path / "out put.mp4",
                       on_progress=lambda f, m: steps_seen.append(m))
    frames = video_frames(out)
    assert frames.shape == (9, 16, 32, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["request"]["seed"] == 7 and sidecar["request"]["frames"] == 9
    assert sidecar["request"]["loras"] == [[str(lora_file.resolve()), 0.8]]
    assert sidecar["loras"][0]["sha256"] and sidecar["loras"][0]["format"] == "diffusion-pipe"
    assert sidecar["motion"] > 0 and len(sidecar["frames_sha256"]) == 64
    assert "step 2/2" in steps_seen


def test_strength_zero_reproduces_the_base_output(pipe, image_path, lora_file, tmp_path):
    base = render_video(pipe, request(image_path), tmp_path / "base.mp4")
    zero = render_video(pipe, request(image_path, loras=[(str(lora_file), 0.0)]), tmp_path / "zero.mp4")
    one = render_video(pipe, request(image_path, loras=[(str(lora_file), 1.0)]), tmp_path / "one.mp4")
    again = render_video(pipe, request(image_path), tmp_path / "base again.mp4")  # LoRA switched off again
    hashes = {p.stem: read_sidecar(p)["frames_sha256"] for p in (base, zero, one, again)}
    assert hashes["zero"] == hashes["base"] == hashes["base again"]
    assert hashes["one"] != hashes["base"]
    assert len(pipe._studio_adapters) == 1  # loaded once, strengths changed with set_adapters


def test_same_lora_in_every_format_gives_the_same_output(pipe, image_path, lora_file, tmp_path):
    weights = load_lora(lora_file)
    hashes = {}
    for fmt in ("diffusion-pipe", "diffusers", "musubi"):  # comfy's down/up variant: see test_lora_io
        file = save_lora_file(weights, tmp_path / f"lora {fmt}.safetensors", fmt)
        out = render_video(pipe, request(image_path, loras=[(str(file), 1.0)]), tmp_path / f"{fmt}.mp4")
        hashes[fmt] = read_sidecar(out)
    frames = {fmt: video_frames(tmp_path / f"{fmt}.mp4").astype(int) for fmt in hashes}
    for fmt in hashes:
        assert np.abs(frames[fmt] - frames["diffusion-pipe"]).max() <= 1, fmt
        assert hashes[fmt]["loras"][0]["format"] == fmt


def test_stacked_loras_each_with_its_own_strength(pipe, image_path, lora_file, tiny_models, tmp_path):
    second = make_lora_dir(tiny_models.wan, tmp_path / "other", seed=2)
    one = read_sidecar(render_video(pipe, request(image_path, loras=[(str(lora_file), 1.0)]), tmp_path / "1.mp4"))
    both = read_sidecar(render_video(pipe, request(image_path, loras=[(str(lora_file), 1.0), (str(second), -0.5)]),
                                     tmp_path / "2.mp4"))
    assert [entry["strength"] for entry in both["loras"]] == [1.0, -0.5]
    assert both["frames_sha256"] != one["frames_sha256"]
    with pytest.raises(GenerationError, match="outside -1..2"):
        render_video(pipe, request(image_path, loras=[(str(lora_file), 2.5)]), tmp_path / "3.mp4")


def test_sweep_gives_one_output_per_strength_and_a_comparison(pipe, image_path, lora_file, tmp_path):
    result = render_sweep(pipe, request(image_path, seed=None, loras=[(str(lora_file), 1.0)]), tmp_path,
                          strengths=[0, 1.0, 1.5])
    assert len(result.videos) == 3 and all(v.exists() for v in result.videos)
    seeds = {read_sidecar(v)["request"]["seed"] for v in result.videos}
    assert len(seeds) == 1  # one seed for every variant
    assert len({read_sidecar(v)["frames_sha256"] for v in result.videos}) == 3
    assert result.labels[0] == "strength 0 (base)" and len(result.motion) == 3
    grid = video_frames(result.comparison)
    assert grid.shape[1:3] == (16 + 16, 3 * 32)  # one row: a label band above each 32x16 tile
    assert json.loads(result.comparison.with_suffix(".json").read_text())["variants"][2]["label"] == "strength 1.5"


def test_epoch_sweep_plan_renders_strength_zero_once(image_path, lora_file, tmp_path):
    epochs = [tmp_path / "run" / f"epoch{i}" / "adapter_model.safetensors" for i in (1, 2)]
    plan = plan_sweep(request(image_path), strengths=[0, 1], lora_files=epochs)
    assert [label for label, _ in plan] == ["strength 0 (base)", "epoch1 @ 1", "epoch2 @ 1"]
    assert plan[2][1].loras == [(str(epochs[1]), 1.0)]
    with pytest.raises(GenerationError, match="needs a LoRA"):
        plan_sweep(request(image_path), strengths=[0, 1])


def test_sidecar_reproduces_the_output(cache, image_path, lora_file, tmp_path):
    first = render_video(cache.pipe, request(image_path, seed=None, loras=[(str(lora_file), 0.7)]),
                         tmp_path / "first.mp4")
    assert request_from_sidecar(first).seed is not None
    again, identical = reproduce(first.with_suffix(".json"), cache, tmp_path / "again.mp4")
    assert identical
    assert read_sidecar(again)["frames_sha256"] == read_sidecar(first)["frames_sha256"]


def test_lora_for_another_model_is_rejected(pipe, image_path, tmp_path):
    from diffusers import WanTransformer3DModel

    other = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16,
                                  text_dim=32, ffn_dim=32, num_layers=3, image_dim=8, added_kv_proj_dim=16)
    file = save_lora(random_peft_lora(other), tmp_path / "other", rank=4, alpha=4)
    with pytest.raises(LoraMismatchError, match=r"blocks\.2\.self_attn\.q.*other shapes"):
        render_video(pipe, request(image_path, loras=[(str(file), 1.0)]), tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_cancel_writes_nothing(pipe, image_path, tmp_path):
    with pytest.raises(GenerationCancelled):
        render_video(pipe, request(image_path, steps=3), tmp_path / "c.mp4", should_stop=lambda: True)
    assert not list(tmp_path.iterdir())


def test_frames_size_and_seed_are_resolved_and_said(image_path):
    resolved, notes = resolve_request(request(image_path, frames=10, height=None, width=50, seed=None), (96, 64))
    assert resolved.frames == 9 and "4k+1" in notes[0]
    assert resolved.width == 48 and resolved.height % 16 == 0 and "multiple of 16" in notes[1]
    assert resolved.seed >= 0
    assert fit_size(832, 480) == (480, 832) and fit_size(480, 832) == (832, 480)
    assert fit_size(1920, 1080) == (480, 848)
    small, _ = resolve_request(request(image_path, height=None, width=None, pixel_budget=224 * 128), (1920, 1080))
    assert (small.height, small.width) == fit_size(1920, 1080, pixel_budget=224 * 128) == (128, 224)
    with pytest.raises(GenerationError, match="steps"):
        resolve_request(request(image_path, steps=0), (96, 64))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "P", "CMYK"])
def test_odd_image_modes_open_as_rgb(tmp_path, mode):
    path = tmp_path / f"img-{mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).convert(mode).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_huge_and_broken_images(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (6000, 3000), (10, 20, 30)).save(huge)
    assert max(open_image(huge).size) == 4096
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(GenerationError, match="not a readable image"):
        open_image(broken)
    with pytest.raises(GenerationError, match="not found"):
        open_image(tmp_path / "missing.png")


def test_motion_score_sees_motion():
    still = np.zeros((5, 32, 48, 3), dtype=np.uint8)
    still[:, 10:20, 10:20] = 255
    moving = np.stack([np.roll(still[0], shift=2 * t, axis=1) for t in range(5)])
    assert motion_score(still) == 0.0
    assert motion_score(moving) > 0.5


def test_comfyui_workflow_loads_the_same_model_and_lora(pipe, image_path, lora_file, tmp_path):
    video = render_video(pipe, request(image_path, loras=[(str(lora_file), 0.75)]), tmp_path / "v.mp4")
    workflow = json.loads(export_comfyui_workflow(video).read_text())
    by_type = {node["class_type"]: node["inputs"] for node in workflow.values()}
    assert by_type["LoraLoaderModelOnly"]["strength_model"] == 0.75
    assert by_type["LoraLoaderModelOnly"]["lora_name"] == "run-a_epoch1.safetensors"
    lora_node = next(node for node in workflow.values() if node["class_type"] == "LoraLoaderModelOnly")
    assert str(lora_file.resolve()) in lora_node["_meta"]["title"]  # says which file to copy where
    assert by_type["CLIPLoader"]["type"] == "wan"
    assert by_type["WanImageToVideo"]["length"] == 9 and by_type["KSampler"]["seed"] == 7
    assert {"UNETLoader", "CLIPVisionLoader", "CLIPVisionEncode", "VAELoader", "LoadImage", "VAEDecode",
            "SaveVideo"} <= set(by_type)
    for node in workflow.values():  # every link points at an existing node's output
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in workflow and isinstance(value[1], int)
    assert len(comfyui_workflow(request(image_path))) == len(workflow) - 1  # no LoRA node without LoRAs


def test_sample_with_transformer_uses_the_in_memory_lora(tiny_models, image_path, tmp_path):
    from peft import LoraConfig

    from engine.lora_io import PEFT_TARGET_MODULES
    from engine.models import load_wan_transformer

    transformer = load_wan_transformer(tiny_models.wan, torch.float32)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGET_MODULES))
    transformer.train()
    out = sample_with_transformer(tiny_models.wan, transformer, request(image_path), tmp_path / "sample.mp4")
    assert video_frames(out).shape == (9, 16, 32, 3)
    assert transformer.training  # mode given back to the trainer
    assert read_sidecar(out)["lora_source"].startswith("in-memory")


def test_cli_sweep_over_epochs(tiny_models, image_path, lora_file, tmp_path, capsys):
    from engine.infer import main

    epoch2 = make_lora_dir(tiny_models.wan, lora_file.parent.parent / "epoch2", seed=5)
    code = main(["--model", tiny_models.wan, "--image", str(image_path), "--prompt", "a warrior jumps",
                 "--epochs", str(lora_file), str(epoch2), "--strengths", "0,1", "--frames", "9", "--steps", "2",
                 "--seed", "3", "--height", "16", "--width", "32", "--device", "cpu", "--comfyui",
                 "--out", str(tmp_path)])
    assert code == 0
    videos = sorted(tmp_path.glob("sweep-*-0[1-9]-*.mp4"))
    assert [read_sidecar(v)["label"] for v in videos] == ["strength 0 (base)", "epoch1 @ 1", "epoch2 @ 1"]
    assert len({read_sidecar(v)["frames_sha256"] for v in videos}) == 3
    assert len(list(tmp_path.glob("*.comfyui.json"))) == 3
    assert "epoch2 @ 1" in capsys.readouterr().out
    assert main(["--reproduce", str(videos[1].with_suffix(".json"))]) == 0
    assert "identical frames" in capsys.readouterr().out
    assert main(["--model", tiny_models.wan, "--image", str(tmp_path / "nope.png"), "--prompt", "x",
                 "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "Image not found" in capsys.readouterr().err
