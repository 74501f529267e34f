"""Caching cost per clip with real-size Wan 2.1 encoders (random weights): the Wan VAE, CLIP ViT-H/14 and UMT5-XXL.

Times engine.training.dataset's encode_frames (clip latents + I2V condition + CLIP image context) on random frames and
encode_caption, and prints the peak GPU memory of each stage (stages run one after another, as cache_dataset does).

    python bench/cache_speed.py [--frames 81] [--height 480] [--width 832] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.core.models import ensure_tiny_kits, load_wan_tokenizer
from engine.training.cache import encode_caption, encode_frames

# Architectures of the encoders in Wan-AI/Wan2.1-I2V-14B-480P-Diffusers.
CLIP_VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14, hidden_act="gelu")
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new")
CAPTION = "a warrior spins and strikes, camera tracks left, dust rises, dramatic light"


def _stage(name: str, started: float, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        torch.cuda.reset_peak_memory_stats()
    else:
        peak = ""
    print(f"| {name} | {time.time() - started:.2f} s{peak} |", flush=True)


def main() -> None:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames = np.random.default_rng(0).integers(0, 255, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}, "
          f"{args.frames} x {args.height} x {args.width}")

    with torch.device(device):
        vae = AutoencoderKLWan().to(dtype).eval()  # the default config is the Wan 2.1 VAE
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H14)).to(dtype).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for run in ("first", "second"):
        started = time.time()
        encode_frames(frames, vae, processor, image_encoder, device=device, dtype=dtype)
        _stage(f"VAE latents + condition + CLIP, {run} clip", started, device)
    del vae, image_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(dtype).eval()
    tokenizer = load_wan_tokenizer(ensure_tiny_kits(Path(tempfile.mkdtemp()) / "models").wan)  # padded to 512 anyway
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for run in ("first", "second"):
        started = time.time()
        encode_caption(CAPTION, tokenizer, text_encoder, device=device, dtype=dtype)
        _stage(f"UMT5-XXL caption, {run}", started, device)


if __name__ == "__main__":
    main()
