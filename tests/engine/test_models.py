"""Tiny kits are real diffusers/transformers folders that load through the users' loader and generate."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core import models

REPO = Path(__file__).resolve().parents[2]


def test_make_tiny_cli_writes_loadable_folders(tmp_path):
    out = tmp_path / "kits ü"
    proc = subprocess.run([sys.executable, "-m", "engine.core.models", "make-tiny", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wan = out / models.TINY_WAN_DIRNAME
    assert json.loads((wan / "model_index.json").read_text())["_class_name"] == "WanImageToVideoPipeline"
    pipe = models.load_wan_pipeline(wan)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.transformer.config.added_kv_proj_dim == pipe.transformer.config.num_attention_heads * \
        pipe.transformer.config.attention_head_dim, "image cross-attention must be enabled as in the real I2V model"
    assert pipe.transformer.config.image_dim == pipe.image_encoder.config.hidden_size
    processor, blip = models.load_blip2(out / models.TINY_BLIP2_DIRNAME)
    assert type(blip).__name__ == "Blip2ForConditionalGeneration" and blip.dtype == torch.float32


def test_kits_are_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    a = models.make_tiny_wan(tmp_path / "a", seed=3)
    b = models.make_tiny_wan(tmp_path / "b", seed=3)
    wa = load_file(a / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "transformer" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tiny_pipeline_generates_a_9_frame_video(tiny_models, tmp_path):
    import cv2
    from diffusers.utils import export_to_video

    pipe = models.load_wan_pipeline(tiny_models.wan)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    frames = pipe(image=image, prompt="a warrior jumps", negative_prompt="blur", height=32, width=48, num_frames=9,
                  num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").frames[0]
    assert frames.shape == (9, 32, 48, 3) and np.isfinite(frames).all()
    path = tmp_path / "out video.mp4"
    export_to_video(list(frames), str(path), fps=16)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9


@pytest.mark.parametrize("component", ["vae", "image_encoder", "scheduler"])
def test_incomplete_wan_folder_names_the_missing_component(tiny_models, tmp_path, component):
    broken = tmp_path / "wan"
    shutil.copytree(tiny_models.wan, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(models.ModelFolderError, match=f"'{component}'"):
        models.load_wan_pipeline(broken)
    proc = subprocess.run([sys.executable, "-m", "engine.core.models", "check", str(broken)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and component in proc.stderr


def test_wrong_folders_are_explained(tiny_models, tmp_path):
    with pytest.raises(models.ModelFolderError, match="not found"):
        models.check_wan_folder(tmp_path / "nowhere")
    with pytest.raises(models.ModelFolderError, match="model_index.json"):
        models.check_wan_folder(tmp_path)
    with pytest.raises(models.ModelFolderError, match="not BLIP-2"):
        models.check_blip2_folder(Path(tiny_models.wan) / "image_encoder")
    with pytest.raises(models.ModelFolderError, match="missing"):
        models.check_blip2_folder(tmp_path)
