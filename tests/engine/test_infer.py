"""Generation on the tiny kit: videos, LoRA strengths, formats, sweeps, reproduction, bad input, trainer samples."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.generate.__main__ import CLI_SETTING_NAMES
from engine.generate.comfyui import comfyui_workflow, export_comfyui_workflow
from engine.generate.lora_files import (
    LoraMismatchError,
    load_lora,
    parse_lora_state,
    save_lora,
    save_lora_file,
)
from engine.generate.pipeline import PipelineCache, PipelineOptions, memory_advice
from engine.generate.render import (
    options_from_sidecar,
    read_sidecar,
    render_video,
    reproduce,
    request_from_sidecar,
    sample_with_transformer,
)
from engine.generate.request import (
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    fit_size,
    open_image,
    output_size,
    resolve_request,
)
from engine.generate.sweep import combine_side_by_side, plan_sweep, render_sweep
from tests.engine.test_lora_io import make_lora_dir, random_peft_lora

SMALL = dict(prompt="a warrior jumps", seed=7, steps=2, frames=9, height=16, width=32)  # small: the VAE dominates
SMALL_GUIDANCE = GenerationRequest.guidance  # the default: guided


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
    # the scheduler comes from the model folder and decides every frame: its class and settings are recorded
    assert sidecar["scheduler"]["class"] == "UniPCMultistepScheduler"
    assert sidecar["scheduler"]["flow_shift"] == 3.0 and sidecar["scheduler"]["solver_type"] == "bh2"
    assert sidecar["torch"] == torch.__version__ and sidecar["device"] == "cpu"
    assert len(sidecar["image_sha256"]) == 64
    assert options_from_sidecar(out).device == "cpu"  # a CPU render is reproduced on the CPU


def test_sidecar_records_a_relative_model_folder_as_an_absolute_path(pipe, image_path, tiny_models, tmp_path,
                                                                      monkeypatch):
    model = Path(tiny_models.wan)
    monkeypatch.chdir(model.parent)
    out = render_video(pipe, request(image_path), tmp_path / "rel.mp4", model=model.name)
    assert read_sidecar(out)["model"] == str(model.resolve())


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
    with pytest.raises(GenerationError, match="is 2.5, but a LoRA strength is a number from -1 to 2"):
        render_video(pipe, request(image_path, loras=[(str(lora_file), 2.5)]), tmp_path / "3.mp4")


def effective_linear(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) a Linear (peft-wrapped or not) applies now, read from its outputs: x @ W.T + b."""
    inputs = module.in_features if hasattr(module, "in_features") else module.base_layer.in_features
    with torch.no_grad():
        bias = module(torch.zeros(1, inputs))[0]
        weight = (module(torch.eye(inputs)) - bias).T
    return weight, bias


def test_accelerator_lora_applies_as_comfyui_does_stacked_with_a_users_lora(pipe, lora_file, tiny_models, tmp_path):
    """W + s*(up@down)*alpha/rank on every adapted Linear (head, embedders included), b + s*diff_b, norm + s*diff;
    the user's LoRA at its own strength on top; all of it gone again when the LoRAs are."""
    from safetensors.torch import load_file, save_file

    from engine.core.models import load_wan_transformer
    from engine.generate.lora_files import to_original_module
    from engine.generate.pipeline import apply_loras
    from tests.engine.test_lora_io import ACCELERATOR, with_alpha

    state = with_alpha(load_file(ACCELERATOR), 8.0)  # rank 4: every LoRA counts twice
    accelerator = tmp_path / "accelerator.safetensors"
    save_file(state, str(accelerator))
    user = load_lora(lora_file)
    base = load_wan_transformer(tiny_models.wan, torch.float32)
    s_accel, s_user = 0.6, 0.8
    apply_loras(pipe, [(str(accelerator), s_accel), (str(lora_file), s_user)])
    try:
        checked = 0
        for name, module in base.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            original = f"diffusion_model.{to_original_module(name)}" if name.startswith(("blocks", "proj_out",
                                                                                          "condition_")) else None
            if original is None or f"{original}.lora_down.weight" not in state:
                continue
            weight = module.weight + s_accel * state[f"{original}.lora_up.weight"] @ state[
                f"{original}.lora_down.weight"] * (8.0 / 4)
            if name in user.modules:
                weight = weight + s_user * user.modules[name].up @ user.modules[name].down * user.modules[name].scale
            got_weight, got_bias = effective_linear(pipe.transformer.get_submodule(name))
            torch.testing.assert_close(got_weight, weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got_bias, module.bias + s_accel * state[f"{original}.diff_b"])
            checked += 1
        assert checked == 2 * 12 + 6  # every block Linear, the head, the time and text embedders, time projection
        diffs = parse_lora_state(state).diffs
        norms = [path for path in diffs if ".norm" in path]
        assert len(norms) == 2 * 6  # q/k norms of both attentions, the cross-attention norm's weight and bias
        for path in norms:
            torch.testing.assert_close(parameter_now(pipe, path), base.get_parameter(path) + s_accel * diffs[path])
    finally:
        apply_loras(pipe, [])
    for path in parse_lora_state(state).diffs:  # every changed parameter is back to the model's own
        torch.testing.assert_close(parameter_now(pipe, path), base.get_parameter(path), rtol=0, atol=0)


def test_accelerator_lora_frames_match_diffusers_load_lora_weights(pipe, image_path, lora_file, tiny_models,
                                                                    tmp_path):
    """Our render with the accelerator LoRA and the user's stacked, against diffusers' own pipeline with both loaded
    by `load_lora_weights`: the same frames. diffusers drops norm diffs (it takes them for zeros) where ComfyUI
    applies them, so the reference file leaves them out (the test above checks them against ComfyUI's rule)."""
    from safetensors.torch import load_file, save_file

    from engine.generate.pipeline import load_pipeline
    from engine.generate.render import generate
    from engine.generate.request import prepare_image
    from tests.engine.test_lora_io import ACCELERATOR

    accelerator = tmp_path / "accelerator.safetensors"
    save_file({k: v for k, v in load_file(ACCELERATOR).items() if not (".norm" in k and ".diff" in k)},
              str(accelerator))
    wanted = request(image_path, loras=[(str(accelerator), 1.0), (str(lora_file), 0.6)])
    ours = generate(pipe, wanted)
    reference = load_pipeline(tiny_models.wan, torch.device("cpu"))
    reference.load_lora_weights(str(accelerator), adapter_name="accelerator")
    reference.load_lora_weights(str(lora_file), adapter_name="user")
    reference.set_adapters(["accelerator", "user"], [1.0, 0.6])
    done = ours.request
    with torch.inference_mode():
        frames = reference(
            image=prepare_image(open_image(image_path), done.height, done.width), prompt=done.prompt,
            negative_prompt=done.negative_prompt, height=done.height, width=done.width, num_frames=done.frames,
            num_inference_steps=done.steps, guidance_scale=done.guidance,
            generator=torch.Generator("cpu").manual_seed(done.seed), output_type="np").frames[0]
    expected = (np.clip(frames, 0, 1) * 255).round().astype(int)
    without = generate(pipe, request(image_path, loras=[(str(lora_file), 0.6)])).frames.astype(int)
    assert np.abs(ours.frames.astype(int) - without).max() > 8  # the accelerator LoRA changes the video
    assert np.abs(ours.frames.astype(int) - expected).max() <= 1


def parameter_now(pipe, path: str) -> torch.Tensor:
    """A transformer parameter by its plain path, also where peft wrapped the module ('...to_q.bias')."""
    module_path, attribute = path.rsplit(".", 1)
    module = pipe.transformer.get_submodule(module_path)
    return getattr(getattr(module, "base_layer", module), attribute)


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


def test_comparison_video_tiles_labels_and_holds_short_clips(tmp_path):
    """Five clips, four across: two rows (the empty cells black), each tile under its label, a shorter clip holding
    its last frame, resized tiles; written atomically (nothing else left in the folder)."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    clips = [np.full((9 if i != 1 else 5, 64, 96, 3), c, np.uint8) for i, c in enumerate(colours)]
    clips[4] = np.full((9, 32, 48, 3), colours[4], np.uint8)  # another size: resized to the first tile's
    out = combine_side_by_side(clips, [f"variant {i}  motion 1.0 % width/s" for i in range(5)], tmp_path / "cmp.mp4",
                               fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.mp4"]
    grid = video_frames(out)[..., ::-1]  # BGR -> RGB
    band = 16
    assert grid.shape == (9, 2 * (band + 64), 4 * 96, 3)
    for i, colour in enumerate(colours):
        top, left = (i // 4) * (band + 64), (i % 4) * 96
        tile = grid[:, top + band + 8: top + band + 56, left + 8: left + 88].reshape(9, -1, 3).mean(axis=1)
        assert np.abs(tile - colour).max() < 12, i  # every frame, the short clip's held last frame too
        label = grid[0, top: top + band, left: left + 96]
        assert label.max() > 150 and np.median(label) < 30  # white text on a black band
    assert grid[:, 64 + 2 * band:, 96:].max() < 30  # the three empty cells of the second row stay black
    with pytest.raises(ValueError, match="one label per clip"):
        combine_side_by_side(clips, ["only one"], tmp_path / "bad.mp4")


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


def test_reproduce_says_when_a_lora_or_the_image_changed_or_vanished(cache, image_path, lora_file, tiny_models,
                                                                     tmp_path):
    lora, image = tmp_path / "my lora.safetensors", tmp_path / "start.png"
    shutil.copyfile(lora_file, lora)
    shutil.copyfile(image_path, image)
    video = render_video(cache.pipe, request(image, loras=[(str(lora), 0.7)]), tmp_path / "v.mp4")
    shutil.copyfile(make_lora_dir(tiny_models.wan, tmp_path / "retrained", seed=9), lora)  # same path, new weights
    with pytest.raises(GenerationError, match=r"LoRA file .*my lora\.safetensors has changed since"):
        reproduce(video, cache, tmp_path / "again.mp4")
    lora.unlink()
    with pytest.raises(GenerationError, match=r"LoRA file .*my lora\.safetensors is gone"):
        reproduce(video, cache, tmp_path / "again.mp4")
    shutil.copyfile(lora_file, lora)
    Image.new("RGB", (96, 64), (0, 0, 0)).save(image)
    with pytest.raises(GenerationError, match=r"start image .*start\.png has changed since"):
        reproduce(video, cache, tmp_path / "again.mp4")
    assert not (tmp_path / "again.mp4").exists()


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


def test_an_epoch_folder_given_as_lora_is_read(image_path, lora_file, tmp_path):
    """`--lora runs/r/epoch1` (a diffusion-pipe epoch folder) means its adapter_model.safetensors; a folder without
    one is a clear error naming it, not a traceback."""
    resolved, _ = resolve_request(request(image_path, loras=[(str(lora_file.parent), 0.5)]), (96, 64))
    assert resolved.loras == [(str(lora_file.resolve()), 0.5)]
    with pytest.raises(GenerationError, match=r"empty.*no \.safetensors file"):
        (tmp_path / "empty").mkdir()
        resolve_request(request(image_path, loras=[(str(tmp_path / "empty"), 1.0)]), (96, 64))


def test_one_side_given_keeps_the_image_aspect(image_path):
    assert output_size((1920, 1080), width=832) == (464, 832)  # not 480p's 480 rows: that would crop the sides
    assert output_size((1080, 1920), height=832) == (832, 464)
    assert output_size((1920, 1080), 480, 480) == (480, 480)  # both given: as given
    resolved, notes = resolve_request(request(image_path, height=None, width=50), (96, 64))
    assert (resolved.height, resolved.width) == (32, 48) and "width 50: not a multiple of 16" in notes[-1]
    with pytest.raises(GenerationError, match="height must be at least 16"):
        resolve_request(request(image_path, height=8, width=None), (96, 64))


def test_out_of_memory_names_the_settings_still_off(tiny_models, image_path, tmp_path, capsys, monkeypatch):
    import engine.generate.__main__ as infer
    from engine.generate.__main__ import main

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(infer, "render_video", out_of_memory)
    argv = ["--model", tiny_models.wan, "--image", str(image_path), "--prompt", "x", "--device", "cpu",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "--cpu-offload and --vae-tiling" in err and "--frames" in err
    offloaded = PipelineOptions(model="m", cpu_offload=True, vae_tiling=True)
    advice = memory_advice(offloaded, CLI_SETTING_NAMES)
    assert "--cpu-offload" not in advice and "--vae-tiling" not in advice and "--height/--width" in advice


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


# Inputs (required, and the optional ones we link) and output counts of the stock ComfyUI nodes, as nodes.py,
# comfy_extras/nodes_wan.py, nodes_model_advanced.py and nodes_video.py declare them.
COMFY_INPUTS = {
    "UNETLoader": {"unet_name", "weight_dtype"},
    "LoraLoaderModelOnly": {"model", "lora_name", "strength_model"},
    "ModelSamplingSD3": {"model", "shift"},
    "CLIPLoader": {"clip_name", "type", "device"},
    "CLIPTextEncode": {"text", "clip"},
    "VAELoader": {"vae_name"},
    "LoadImage": {"image"},
    "CLIPVisionLoader": {"clip_name"},
    "CLIPVisionEncode": {"clip_vision", "image", "crop"},
    "WanImageToVideo": {"positive", "negative", "vae", "width", "height", "length", "batch_size",
                        "clip_vision_output", "start_image"},
    "KSampler": {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                 "latent_image", "denoise"},
    "VAEDecode": {"samples", "vae"},
    "CreateVideo": {"images", "fps"},
    "SaveVideo": {"video", "filename_prefix", "format", "codec"},
}
COMFY_OUTPUTS = {"LoadImage": 2, "WanImageToVideo": 3}  # the others have one


def test_comfyui_workflow_matches_the_nodes_and_our_sampling(pipe, image_path, lora_file, tmp_path):
    video = render_video(pipe, request(image_path, guidance=0.5, loras=[(str(lora_file), 1.0)]), tmp_path / "v.mp4")
    sidecar = read_sidecar(video)
    workflow = json.loads(export_comfyui_workflow(video).read_text())
    for node in workflow.values():
        assert set(node["inputs"]) == COMFY_INPUTS[node["class_type"]], node["class_type"]
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert 0 <= value[1] < COMFY_OUTPUTS.get(workflow[value[0]]["class_type"], 1)
    by_type = {node["class_type"]: node["inputs"] for node in workflow.values()}
    i2v = next(i for i, node in workflow.items() if node["class_type"] == "WanImageToVideo")
    sampler = by_type["KSampler"]
    assert (sampler["positive"], sampler["negative"], sampler["latent_image"]) == ([i2v, 0], [i2v, 1], [i2v, 2])
    # the CLIP image encoder saw the centre crop (diffusers' CLIPImageProcessor), not the squashed frame
    assert by_type["CLIPVisionEncode"]["crop"] == "center"
    # our scheduler: UniPC bh2 with the model folder's flow shift; guidance <= 1 is no guidance, ComfyUI's cfg 1
    assert sampler["sampler_name"] == "uni_pc_bh2" and sampler["scheduler"] == "simple"
    assert sampler["cfg"] == 1.0 and by_type["ModelSamplingSD3"]["shift"] == 3.0
    sidecar["scheduler"]["flow_shift"] = 5.0  # a model folder whose scheduler shifts more
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(sidecar))
    workflow = json.loads(export_comfyui_workflow(shifted).read_text())
    assert next(n for n in workflow.values() if n["class_type"] == "ModelSamplingSD3")["inputs"]["shift"] == 5.0
    with pytest.raises(GenerationError, match="DPMSolverMultistepScheduler"):
        comfyui_workflow(request(image_path), scheduler={"class": "DPMSolverMultistepScheduler", "flow_shift": 5.0})


@pytest.mark.parametrize("scheduler, sampler_name", [("lcm", "lcm"), ("euler", "euler")])
def test_scheduler_and_flow_shift_are_rendered_recorded_reproduced_and_exported(
        cache, image_path, tmp_path, scheduler, sampler_name):
    """The sampler settings step-distillation LoRAs need: flow-match LCM or Euler at its own shift, in the sidecar,
    rendered again identically (LCM's per-step noise is seeded) and in the ComfyUI workflow."""
    pipe = cache.pipe
    video = render_video(pipe, request(image_path, scheduler=scheduler, flow_shift=5.0, guidance=1.0),
                         tmp_path / f"{scheduler}.mp4")
    recorded = read_sidecar(video)
    assert recorded["request"]["scheduler"] == scheduler and recorded["request"]["flow_shift"] == 5.0
    assert recorded["scheduler"]["class"] == {"lcm": "FlowMatchLCMScheduler",
                                              "euler": "FlowMatchEulerDiscreteScheduler"}[scheduler]
    assert recorded["scheduler"]["shift"] == 5.0
    unipc = read_sidecar(render_video(pipe, request(image_path, guidance=1.0), tmp_path / "unipc.mp4"))
    assert unipc["scheduler"]["class"] == "UniPCMultistepScheduler" and unipc["scheduler"]["flow_shift"] == 3.0
    assert unipc["frames_sha256"] != recorded["frames_sha256"]
    _, identical = reproduce(video, cache)
    assert identical
    workflow = json.loads(export_comfyui_workflow(video).read_text())
    by_type = {node["class_type"]: node["inputs"] for node in workflow.values()}
    assert by_type["KSampler"]["sampler_name"] == sampler_name and by_type["ModelSamplingSD3"]["shift"] == 5.0
    with pytest.raises(GenerationError, match="flow shift"):
        resolve_request(request(image_path, flow_shift=0.5), (96, 64))
    with pytest.raises(GenerationError, match="scheduler 'dpm'"):
        resolve_request(request(image_path, scheduler="dpm"), (96, 64))


def test_draft_then_render_in_full_keeps_seed_and_strengths(cache, image_path, lora_file, tmp_path):
    """Draft: the accelerator LoRA stacked after the person's, 4 LCM steps without guidance at shift 5; its sidecar
    gives back the full-quality request (same seed and strengths, no accelerator), which renders as a plain full
    render does. A draft sweep varies the person's LoRA and keeps the accelerator at its strength."""
    from engine.generate.draft import DraftSettings, full_request
    from tests.engine.test_lora_io import ACCELERATOR

    pipe = cache.pipe
    draft = DraftSettings(lora=str(ACCELERATOR), steps=2)
    wanted = request(image_path, seed=None, steps=3, loras=[(str(lora_file), 0.7)])
    video = render_video(pipe, wanted, tmp_path / "draft.mp4", draft=draft)
    sidecar = read_sidecar(video)
    done = sidecar["request"]
    assert (done["steps"], done["guidance"], done["scheduler"], done["flow_shift"]) == (2, 1.0, "lcm", 5.0)
    assert done["decode_bf16"] and not full_request(sidecar).decode_bf16  # a preview decode (bf16 on a GPU)
    assert done["loras"] == [[str(lora_file.resolve()), 0.7], [str(ACCELERATOR), 1.0]]
    full = full_request(sidecar)
    assert full.seed == done["seed"] and full.loras == [(str(lora_file.resolve()), 0.7)]
    assert (full.steps, full.guidance, full.scheduler, full.flow_shift) == (3, SMALL_GUIDANCE, "unipc", None)
    in_full = render_video(pipe, full, tmp_path / "full.mp4")
    direct = render_video(pipe, replace(wanted, seed=done["seed"]), tmp_path / "direct.mp4")
    assert read_sidecar(in_full)["frames_sha256"] == read_sidecar(direct)["frames_sha256"] != sidecar["frames_sha256"]
    with pytest.raises(GenerationError, match="not a draft"):
        full_request(read_sidecar(in_full))
    swept = render_sweep(pipe, wanted, tmp_path / "sweep", strengths=[0.5, 1.0], draft=draft)
    variants = [read_sidecar(v) for v in swept.videos]
    assert [v["request"]["loras"] for v in variants] == [
        [[str(lora_file.resolve()), s], [str(ACCELERATOR), 1.0]] for s in (0.5, 1.0)]
    assert all(v["request"]["steps"] == 2 and v["draft"]["full"]["steps"] == 3 for v in variants)
    assert full_request(variants[1]).loras == [(str(lora_file.resolve()), 1.0)]


def test_a_sweep_encodes_the_start_image_once(pipe, image_path, lora_file, tmp_path):
    """The I2V condition (start image padded to the clip, through the VAE) is encoded once for the same image and
    size: every variant of a sweep after the first reuses it; another size encodes again."""
    from engine.generate.render import generate

    generate(pipe, request(image_path, height=32, width=48))
    calls = []
    encode = pipe.vae.encode.encode
    pipe.vae.encode.encode = lambda x, *args, **kwargs: calls.append(tuple(x.shape)) or encode(x, *args, **kwargs)
    try:
        swept = render_sweep(pipe, request(image_path, loras=[(str(lora_file), 1.0)]), tmp_path,
                             strengths=[0.0, 0.5, 1.0])
        assert len(calls) == 1 and len(swept.videos) == 3
        generate(pipe, request(image_path, height=32, width=48))
        assert len(calls) == 2
    finally:
        pipe.vae.encode.encode = encode
    again = render_video(pipe, request(image_path, loras=[(str(lora_file), 0.5)]), tmp_path / "again.mp4")
    assert read_sidecar(again)["frames_sha256"] == read_sidecar(swept.videos[1])["frames_sha256"]


def test_sample_with_transformer_uses_the_in_memory_lora(tiny_models, image_path, tmp_path):
    from peft import LoraConfig

    from engine.core.models import load_wan_transformer
    from engine.generate.lora_files import PEFT_TARGET_MODULES

    transformer = load_wan_transformer(tiny_models.wan, torch.float32)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGET_MODULES))
    transformer.train()
    out = sample_with_transformer(tiny_models.wan, {"transformer": transformer}, request(image_path),
                                  tmp_path / "sample.mp4")
    assert video_frames(out).shape == (9, 16, 32, 3)
    assert transformer.training  # mode given back to the trainer
    assert read_sidecar(out)["lora_source"].startswith("in-memory")


def test_cli_sweep_over_epochs(tiny_models, image_path, lora_file, tmp_path, capsys):
    from engine.generate.__main__ import main

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
