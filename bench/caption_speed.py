"""Captioning time per clip: 3 frames read with OpenCV, captioned by BLIP-2 with exactly 30 new tokens each.

    python bench/caption_speed.py                      # tiny BLIP-2 kit on the CPU (float32)
    python bench/caption_speed.py --real-arch          # BLIP-2 opt-2.7b architecture, random weights, fp16 on CUDA
    python bench/caption_speed.py --real-arch --device cpu --layers-scale 0.05   # the same code, small, on a CPU
    python bench/caption_speed.py --real-arch --video-arch 3b,7b   # + Qwen2.5-VL 3B and 7B watching each clip

The video-language rows time the studio's video captioner (engine/captions/vlm.py) on the same clips: each 81-frame
clip watched at 4 frames per second (21 frames at 832x480, the model's default pixel budget per frame), bf16,
NEW_TOKENS_VIDEO new tokens. With torchvision present (the GPU image has it) the row "video patches vs transformers"
compares our NumPy patches with transformers' Qwen2VLVideoProcessor on the same frames.

The real architecture is built from the config values below (no download): the model's compute is that of
Salesforce/blip2-opt-2.7b. Its OPT tokenizer cannot be fetched offline, so a word-level tokenizer with the same
vocabulary size (placeholder words) stands in for encoding the (empty) prompt and decoding the output; that does not
change the model's work. Every caption is forced to
30 new tokens (min = max), since random weights would otherwise stop at an arbitrary length.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.captions.captioners import Blip2Captioner, CaptionerSettings, read_clip_frames, suggest_captions
from engine.captions.store import CaptionStore
from engine.core.models import TINY_BLIP2_DIRNAME, ensure_tiny_kits

# Salesforce/blip2-opt-2.7b, from its config.json.
BLIP2_OPT_2_7B = dict(
    vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                patch_size=14, image_size=224, layer_norm_eps=1e-6),
    qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522),
    text=dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
              max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True,
              pad_token_id=1, bos_token_id=2, eos_token_id=50118),
    num_query_tokens=32,
)
NEW_TOKENS = 30
NEW_TOKENS_VIDEO = 60  # a one-sentence motion caption

# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct, from their config.json (text, then vision tower).
QWEN25_VL = {
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
               vision=dict(out_hidden_size=2048)),
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
               vision=dict(out_hidden_size=3584)),
}
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656}
QWEN_VIDEO_PREPROCESSOR = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}  # transformers' video defaults


def make_clips(folder: Path, count: int, frames: int, size: tuple[int, int]) -> None:
    """`count` clips at the studio's export size (832x480, 81 frames by default): a moving gradient and a ball."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        def frame(t: int) -> np.ndarray:
            image = np.stack([(xx + 9 * t) % 256, (yy + 40 * i) % 256, (xx + yy - 5 * t) % 256], -1)
            cx, cy = (40 + 9 * t) % width, height // 2
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < 40 ** 2] = (250, 210, 40)
            return image.astype(np.uint8)

        # OpenCV's own MPEG-4 writer: the GPU image has OpenCV but no ffmpeg binary; the captioners read with OpenCV.
        writer = cv2.VideoWriter(str(folder / f"clip {i:02d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 16,
                                 (width, height))
        for t in range(frames):
            writer.write(cv2.cvtColor(frame(t), cv2.COLOR_RGB2BGR))
        writer.release()


def placeholder_opt_tokenizer():
    """A local tokenizer with OPT's vocabulary size and special-token ids, so every generated id decodes to a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>", 50265: "<image>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(BLIP2_OPT_2_7B["text"]["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="<unk>")
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return wrapped


def build_real_arch(tokenizer, device: str, dtype: torch.dtype, layers_scale: float):
    """(processor, model): BLIP-2 opt-2.7b's architecture with random weights, built directly on `device`."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    def scaled(layers: int) -> int:
        return max(1, round(layers * layers_scale))

    spec = BLIP2_OPT_2_7B
    vision = {**spec["vision"], "num_hidden_layers": scaled(spec["vision"]["num_hidden_layers"])}
    qformer = {**spec["qformer"], "num_hidden_layers": max(2, scaled(spec["qformer"]["num_hidden_layers"]))}
    text = {**spec["text"], "num_hidden_layers": scaled(spec["text"]["num_hidden_layers"])}
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(vision_config=Blip2VisionConfig(**vision).to_dict(),
                         qformer_config=Blip2QFormerConfig(**qformer).to_dict(),
                         text_config=OPTConfig(**text).to_dict(), num_query_tokens=spec["num_query_tokens"],
                         image_token_index=image_token)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    size = spec["vision"]["image_size"]
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                               tokenizer=tokenizer, num_query_tokens=spec["num_query_tokens"])
    layers = (vision["num_hidden_layers"], qformer["num_hidden_layers"], text["num_hidden_layers"])
    return processor, model, layers


def placeholder_qwen_tokenizer(vocab_size: int):
    """A local word-level tokenizer with Qwen2.5's vocabulary size and special-token ids (the real one is not
    fetched offline): the model's work per token is the same."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    by_id = {i: t for t, i in QWEN_SPECIAL_IDS.items()}
    vocab = {by_id.get(i, f"w{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token="w0")
    wrapped.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_IDS)})
    return wrapped


def build_qwen_vl(arch: str, device: str, template: str, layers_scale: float):
    """A VideoLanguageCaptioner around Qwen2.5-VL-`arch`'s architecture with random bf16 weights on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from engine.captions.vlm import ClipVideoProcessor, VideoLanguageCaptioner

    spec = QWEN25_VL[arch]
    text = {**spec["text"], "num_hidden_layers": max(1, round(spec["text"]["num_hidden_layers"] * layers_scale))}
    vision = {**QWEN25_VL_VISION, **spec["vision"], "depth": max(1, round(32 * layers_scale))}
    vision["fullatt_block_indexes"] = [i for i in QWEN25_VL_VISION["fullatt_block_indexes"] if i < vision["depth"]]
    tokenizer = placeholder_qwen_tokenizer(text["vocab_size"])
    config = Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [16, 24, 24]},
                     "bos_token_id": None, "eos_token_id": QWEN_SPECIAL_IDS["<|im_end|>"],
                     "pad_token_id": QWEN_SPECIAL_IDS["<|endoftext|>"]},
        vision_config=vision, image_token_id=QWEN_SPECIAL_IDS["<|image_pad|>"],
        video_token_id=QWEN_SPECIAL_IDS["<|video_pad|>"], vision_start_token_id=QWEN_SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_IDS["<|vision_end|>"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    captioner = VideoLanguageCaptioner.from_loaded(
        tokenizer, model, template, ClipVideoProcessor(QWEN_VIDEO_PREPROCESSOR),
        f"Qwen2.5-VL-{arch.upper()} arch (random weights)", max_new_tokens=NEW_TOKENS_VIDEO,
        min_new_tokens=NEW_TOKENS_VIDEO)
    return captioner, (vision["depth"], text["num_hidden_layers"])


def compare_with_transformers(frames: np.ndarray) -> str:
    """Max and mean |difference| of our video patches vs transformers' Qwen2VLVideoProcessor (needs torchvision)."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError as err:
        return f"not compared ({err})"
    from engine.captions.vlm import ClipVideoProcessor

    ours, grid = ClipVideoProcessor(QWEN_VIDEO_PREPROCESSOR)(frames)
    theirs = Qwen2VLVideoProcessor(min_pixels=QWEN_VIDEO_PREPROCESSOR["min_pixels"],
                                   max_pixels=QWEN_VIDEO_PREPROCESSOR["max_pixels"])(
        videos=[frames], return_tensors="np", do_sample_frames=False)
    if tuple(theirs["video_grid_thw"][0]) != grid:
        return f"grids differ: ours {grid}, transformers {tuple(theirs['video_grid_thw'][0])}"
    diff = np.abs(ours - np.asarray(theirs["pixel_values_videos"]).reshape(ours.shape))
    return f"same grid {grid}; |diff| max {diff.max():.3f}, mean {diff.mean():.4f} (normalised units)"


def time_video_captioners(args, device: str, clips_dir: Path, names: list[str], template: str) -> list[tuple]:
    """One row per Qwen2.5-VL architecture: load, seconds per clip, peak allocated and reserved GiB."""
    from engine.captions.vlm import DEFAULT_VIDEO_FPS, read_clip_video

    rows = []
    for arch in [a.strip().lower() for a in args.video_arch.split(",") if a.strip()]:
        started = time.perf_counter()
        captioner, layers = build_qwen_vl(arch, device, template, args.layers_scale)
        load_s = time.perf_counter() - started
        params = sum(p.numel() for p in captioner._model.parameters())
        store = CaptionStore(clips_dir)
        suggest_captions(store, captioner, clips=names[:1], overwrite=True)  # warm-up
        video = read_clip_video(clips_dir / names[1], DEFAULT_VIDEO_FPS)
        tokens = int((captioner.model_inputs(video)["mm_token_type_ids"] == 2).sum())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        report = suggest_captions(store, captioner, clips=names[1:], overwrite=True)
        if device == "cuda":
            torch.cuda.synchronize()
        per_clip = (time.perf_counter() - started) / len(names[1:])
        if report.failed:
            raise SystemExit(f"error: {report.failed}")
        peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} / {torch.cuda.max_memory_reserved() / 2**30:.1f}"
                if device == "cuda" else "-")
        rows.append((f"Qwen2.5-VL-{arch.upper()} arch, vision/text layers {layers[0]}/{layers[1]}",
                     f"{params / 1e9:.2f} B", f"{load_s:.1f} s", f"{len(video.frames)} frames -> {tokens} tokens",
                     f"{per_clip:.2f} s", peak))
        captioner.unload()
        del captioner
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-arch", action="store_true", help="BLIP-2 opt-2.7b architecture, random weights")
    parser.add_argument("--device", help="cuda or cpu (default: cuda for --real-arch, else cpu)")
    parser.add_argument("--layers-scale", type=float, default=1.0,
                        help="multiply every layer count (e.g. 0.05 for a quick CPU check of --real-arch)")
    parser.add_argument("--clips", type=int, default=6, help="clips timed (after one warm-up clip)")
    parser.add_argument("--frames", type=int, default=3, help="frames captioned per clip")
    parser.add_argument("--clip-frames", type=int, default=81, help="frames in each generated clip")
    parser.add_argument("--size", default="832x480", help="generated clip size WxH")
    parser.add_argument("--batch-clips", type=int, default=1, help="clips whose frames share one forward pass")
    parser.add_argument("--video-arch", default="", help="also time the video captioner on Qwen2.5-VL "
                                                         "architectures with random weights: 3b, 7b or 3b,7b")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.real_arch else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: use --device cpu (with --layers-scale for --real-arch)")
    dtype = torch.float16 if device == "cuda" else torch.float32
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        tmp = Path(tmp)
        kits = ensure_tiny_kits(tmp / "models")
        started = time.perf_counter()
        if args.real_arch:
            processor, model, layers = build_real_arch(placeholder_opt_tokenizer(), device, dtype, args.layers_scale)
            captioner = Blip2Captioner.from_loaded(processor, model, "blip2-opt-2.7b (random weights)",
                                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                   batch_size=args.frames * args.batch_clips)
            model_name = f"BLIP-2 opt-2.7b arch, layers vision/qformer/opt = {layers[0]}/{layers[1]}/{layers[2]}"
        else:
            captioner = Blip2Captioner(Path(kits.captioner), device=device, max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, batch_size=args.frames * args.batch_clips)
            captioner.load()
            model_name = f"tiny kit ({TINY_BLIP2_DIRNAME})"
        if device == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - started
        params = sum(p.numel() for p in captioner._model.parameters())

        clips_dir = tmp / "clips"
        clips_dir.mkdir()
        make_clips(clips_dir, args.clips + args.batch_clips, args.clip_frames, (width, height))
        store = CaptionStore(clips_dir)
        names = store.list_clips()
        settings = CaptionerSettings(frames_per_clip=args.frames, batch_size=args.frames * args.batch_clips)
        suggest_captions(store, captioner, clips=names[:args.batch_clips], settings=settings)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for name in names[args.batch_clips:]:
            read_clip_frames(clips_dir / name, args.frames)
        read_s = (time.perf_counter() - started) / args.clips
        started = time.perf_counter()
        report = suggest_captions(store, captioner, clips=names[args.batch_clips:], settings=settings)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if report.failed or len(report.suggested) != args.clips:
            print(f"error: {report.failed}", file=sys.stderr)
            return 1
        peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} / {torch.cuda.max_memory_reserved() / 2**30:.1f}"
                if device == "cuda" else "-")
        card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
        video_rows, check = [], ""
        if args.video_arch:
            captioner.unload()
            template = (Path(kits.video_captioner) / "chat_template.jinja").read_text(encoding="utf-8")
            video_rows = time_video_captioners(args, device, clips_dir, names, template)
            from engine.captions.vlm import read_clip_video

            check = compare_with_transformers(read_clip_video(clips_dir / names[1]).frames)

    rows = [
        ("model", model_name),
        ("parameters", f"{params / 1e6:,.1f} M"),
        ("device / dtype", f"{device} ({card}) / {str(dtype).replace('torch.', '')}"),
        ("clips timed", f"{args.clips} ({width}x{height}, {args.clip_frames} frames each)"),
        ("frames per clip / new tokens per frame", f"{args.frames} / {NEW_TOKENS}"),
        ("clips per forward pass", str(args.batch_clips)),
        ("build/load time", f"{load_s:.1f} s"),
        ("time per clip (read frames + caption + merge)", f"{elapsed / args.clips:.3f} s"),
        ("  of which reading the frames (OpenCV)", f"{read_s:.3f} s"),
        ("peak GPU memory allocated / reserved", f"{peak} GiB"),
    ]
    print("| caption_speed | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    if video_rows:
        print(f"\n| video captioner ({NEW_TOKENS_VIDEO} new tokens per clip) | parameters | build | watched | "
              "time per clip | peak GiB allocated / reserved |\n|---|---|---|---|---|---|")
        for row in video_rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nvideo patches vs transformers: {check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
