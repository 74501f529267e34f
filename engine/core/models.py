"""Model registry, loaders and tiny model kits.

Every model the studio uses (a Wan I2V pipeline of a family in engine.core.families, and BLIP-2) is loaded by one
function per model that takes a local folder or a hub id and returns the real diffusers/transformers objects. The
tiny kits are built from configs of the same classes with random weights and saved with `save_pretrained` in the hub
repos' layout, so tests and the demo go through exactly the code path that real 14B folders go through. Weights are
only ever read from safetensors, never from pickles.

Command line: `python -m engine.core.models make-tiny --out DIR [--seed N]` and
`python -m engine.core.models check PATH`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.families import ModelFamily, Wan21I2V, Wan22I2V, family_of
from engine.core.files import atomic_dir

BLIP2_HUB_ID = "Salesforce/blip2-opt-2.7b"
TINY_WAN_DIRNAME = "tiny-wan2.1-i2v"
TINY_WAN22_DIRNAME = "tiny-wan2.2-i2v-a14b"
TINY_BLIP2_DIRNAME = "tiny-blip2"
TINY_VLM_DIRNAME = "tiny-qwen2.5-vl"

# Wan 2.1 I2V 14B 480p transformer: the real architecture, used by the GPU benchmarks (random weights).
WAN_I2V_14B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)

# Wan 2.2 I2V A14B experts: the 14B architecture without the image cross-attention (no CLIP image context).
WAN22_I2V_A14B_TRANSFORMER_CONFIG = {**WAN_I2V_14B_TRANSFORMER_CONFIG, "image_dim": None, "added_kv_proj_dim": None}
# BLIP-2 folder files; "a|b" means either (transformers 5 writes processor_config.json, the hub repo has the older one).
BLIP2_REQUIRED_FILES = ("config.json", "*.safetensors", "processor_config.json|preprocessor_config.json",
                        "tokenizer_config.json")

# Words for the tiny kits' word-level tokenizers: enough for demo captions to map to real token ids.
_TINY_WORDS = (
    "a an the of and with in on at to from into over under across through behind near front back left right up "
    "down slowly quickly fast camera shot close wide view pan zoom tracking static scene light dark bright sunlight "
    "night day sky cloud clouds sea water river forest tree trees grass field city street road building room wall "
    "floor window door person man woman child warrior figure fighter dancer runner hair golden black white red blue "
    "green yellow orange purple grey long short armor cloak sword shield staff spear bow arrow fire smoke dust rain "
    "snow wind storm spark sparks glow motion blur action jump jumps jumping run runs running walk walks walking "
    "spin spins spinning turn turns turning strike strikes striking swing swings swinging kick kicks kicking punch "
    "punches dodge dodges roll rolls fall falls rise rises fly flies flying leap leaps dash dashes slash slashes "
    "block blocks charge charges attack attacks fight fighting battle dramatic dynamic cinematic style anime "
    "animation realistic painted soft sharp smooth rapid sudden powerful graceful energetic two three ball square "
    "circle shape shapes moving bouncing colorful background foreground stripes pattern frame video clip"
).split()


@dataclass(frozen=True)
class ModelChoice:
    """Which models a studio or a run uses: a local folder or a hub id for each."""

    wan: str
    captioner: str
    video_captioner: str = ""  # a video-language model (Qwen2.5-VL) folder or hub id; empty: none chosen
    wan22: str = ""  # the tiny kits' Wan 2.2 I2V A14B folder (the demo offers both families)


class ModelFolderError(ValueError):
    """A model folder or hub id that cannot be used, with what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------- tiny model kits

def _word_tokenizer(specials: list[str], model_max_length: int, **special_tokens):
    """A word-level fast tokenizer built locally (no download), wrapped as transformers expects."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + sorted(set(_TINY_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if "eos_token" in special_tokens and special_tokens.get("append_eos", True):
        eos = special_tokens["eos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    special_tokens.pop("append_eos", None)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **special_tokens)
    return tokenizer, len(vocab)


def make_tiny_wan(out_dir: str | Path, seed: int = 0, family: type[ModelFamily] = Wan21I2V) -> Path:
    """Write a tiny Wan I2V pipeline folder laid out like the family's hub repo (random weights, no network).

    Wan 2.1 (`Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`): one transformer with the image cross-attention enabled
    (added_kv_proj_dim, image_dim = CLIP hidden size) and a CLIP image encoder, as the real I2V model.
    Wan 2.2 (`Wan-AI/Wan2.2-I2V-A14B-Diffusers`): a high-noise `transformer` and a low-noise `transformer_2` without
    image cross-attention, no image encoder, `boundary_ratio` in model_index.json. Deterministic for a given seed.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _word_tokenizer(
        ["<pad>", "</s>", "<unk>"], model_max_length=512, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    clip_hidden, heads, head_dim = 8, 2, 12
    parts = {}
    if family.image_encoder:
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=clip_hidden, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
            intermediate_size=16, projection_dim=8,
        )).eval()
        parts["image_processor"] = CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True,
        )
    image_attention = dict(image_dim=clip_hidden, added_kv_proj_dim=heads * head_dim) if family.image_encoder else \
        dict(image_dim=None, added_kv_proj_dim=None)
    for expert in family.experts:
        parts[expert.subfolder] = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **image_attention,
        ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=family.flow_shift,
    )
    if family.default_boundary is not None:
        parts["boundary_ratio"] = family.default_boundary
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   **parts)
    _save_into(out_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out_dir


def make_tiny_blip2(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny BLIP-2 (OPT) folder laid out like `Salesforce/blip2-opt-2.7b`: config, weights, processor."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"], model_max_length=512, append_eos=False,
        bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    num_query_tokens = 4
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            encoder_hidden_size=32, vocab_size=vocab_size,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
            max_position_embeddings=512, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        ).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, num_query_tokens=num_query_tokens,
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    _save_into(out_dir, save)
    return out_dir


def make_tiny_qwen_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL folder laid out like `Qwen/Qwen2.5-VL-7B-Instruct`: config, safetensors weights,
    tokenizer with the vision tokens, image/video preprocessing config and a chat template of the same shape."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *vision, "<unk>"]
    tokenizer, vocab_size = _word_tokenizer(specials, model_max_length=8192, append_eos=False,
                                            eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *vision]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Few pixels per frame keep the CPU demo quick: 56x84 -> 2x3 merged tokens per frame pair.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84)
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
                "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'video' %}"
                "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
                "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")

    _save_into(out_dir, save)
    return out_dir


def _save_into(out_dir: Path, save) -> None:
    """Save into a temporary sibling folder, then move it into place: no half-written model folder survives."""
    with atomic_dir(out_dir) as tmp:
        save(tmp)


def ensure_tiny_kits(models_dir: str | Path, seed: int = 0) -> ModelChoice:
    """Build the tiny demo kits (Wan 2.1, Wan 2.2, BLIP-2) under `models_dir` unless they are already there."""
    models_dir = Path(models_dir)
    wan_dir, blip_dir = models_dir / TINY_WAN_DIRNAME, models_dir / TINY_BLIP2_DIRNAME
    wan22_dir = models_dir / TINY_WAN22_DIRNAME
    if not (wan_dir / "model_index.json").exists():
        make_tiny_wan(wan_dir, seed=seed)
    if not (wan22_dir / "model_index.json").exists():
        make_tiny_wan(wan22_dir, seed=seed, family=Wan22I2V)
    if not (blip_dir / "config.json").exists():
        make_tiny_blip2(blip_dir, seed=seed)
    vlm_dir = models_dir / TINY_VLM_DIRNAME
    if not (vlm_dir / "config.json").exists():
        make_tiny_qwen_vl(vlm_dir, seed=seed)
    return ModelChoice(wan=str(wan_dir), captioner=str(blip_dir), video_captioner=str(vlm_dir), wan22=str(wan22_dir))


# ---------------------------------------------------------------------------------------------- checks and loaders

def is_local(source: str | Path) -> bool:
    """A source is a local folder when it exists or looks like a path; otherwise it is taken as a hub id."""
    text = str(source)
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1


def check_wan_folder(source: str | Path) -> type[ModelFamily]:
    """Return the family of a Wan I2V pipeline folder (engine.core.families); raise ModelFolderError naming the
    first missing component of a local folder. A hub id is taken as it is (from_pretrained reports problems)."""
    family = family_of(source)
    if not is_local(source):
        return family
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ModelFolderError(
            f"Wan model folder not found: {root}. Give a local copy of {Wan21I2V.hub_id} or {Wan22I2V.hub_id}, or "
            "its hub id."
        )
    if not (root / "model_index.json").exists():
        raise ModelFolderError(
            f"{root} is not a diffusers pipeline folder (no model_index.json). Point at the folder of "
            f"{Wan21I2V.hub_id} or {Wan22I2V.hub_id}, not at a single .safetensors file or a ComfyUI checkpoint."
        )
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") != "WanImageToVideoPipeline":
        raise ModelFolderError(
            f"{root} holds a {index.get('_class_name')!r}, not a WanImageToVideoPipeline (Wan image-to-video)."
        )
    for component, patterns in family.components.items():
        folder = root / component
        missing = [p for p in patterns if not any(folder.glob(p))]
        if missing:
            raise ModelFolderError(
                f"{family.title} folder {root} is incomplete: component '{component}' is missing "
                f"{', '.join(missing)} in {folder}. Download the whole {family.hub_id} repo."
            )
    return family


def wan_transformer_config(source: str | Path) -> dict | None:
    """The transformer's config.json of a local Wan folder (num_layers, num_attention_heads, attention_head_dim,
    ffn_dim, ...); None for a hub id or an unreadable folder."""
    try:
        return json.loads((Path(source) / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_blip2_folder(source: str | Path) -> None:
    """Raise ModelFolderError when a local captioner folder is missing files or is not BLIP-2."""
    if not is_local(source):
        return
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"Captioner folder not found: {root}. Give a local copy of {BLIP2_HUB_ID} or its hub "
                               "id.")
    config = root / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.exists() else None
    if config.exists() and model_type != "blip-2":
        raise ModelFolderError(
            f"{root} holds a {model_type!r} model, not BLIP-2. Use {BLIP2_HUB_ID} or another BLIP-2 checkpoint."
        )
    missing = [p for p in BLIP2_REQUIRED_FILES if not any(any(root.glob(alt)) for alt in p.split("|"))]
    if missing:
        raise ModelFolderError(f"Captioner folder {root} is incomplete: missing {', '.join(missing)}.")


def _from_pretrained(cls, source: str | Path, **kwargs):
    """from_pretrained with safetensors only, turning hub/offline failures into a ModelFolderError."""
    try:
        return cls.from_pretrained(str(Path(source).expanduser()) if is_local(source) else str(source),
                                   use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError) as err:
        raise ModelFolderError(f"Could not load {cls.__name__} from {source}: {err}") from err


def load_wan_pipeline(source: str | Path, torch_dtype: torch.dtype = torch.float32, **components):
    """Load a WanImageToVideoPipeline from a folder or hub id; `components` replaces parts (e.g. transformer=...)."""
    from diffusers import WanImageToVideoPipeline

    check_wan_folder(source)
    return _from_pretrained(WanImageToVideoPipeline, source, dtype=torch_dtype, **components)


def load_wan_transformer(source: str | Path, torch_dtype: torch.dtype = torch.bfloat16, expert: str | None = None):
    """One transformer of the folder: `expert` by name (engine.core.families), default the family's first."""
    from diffusers import WanTransformer3DModel

    family = check_wan_folder(source)
    chosen = family.expert(expert) if expert else family.experts[0]
    return _from_pretrained(WanTransformer3DModel, source, subfolder=chosen.subfolder, dtype=torch_dtype)


def load_wan_vae(source: str | Path, torch_dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLWan

    check_wan_folder(source)
    return _from_pretrained(AutoencoderKLWan, source, subfolder="vae", dtype=torch_dtype)


def normalize_latents(vae, raw: torch.Tensor) -> torch.Tensor:
    """VAE latents [B, C, F, H, W] as the Wan transformer sees them: (raw - mean) / std per channel, the statistics
    from the VAE's config (latents_mean, latents_std: what WanImageToVideoPipeline uses), in raw's dtype and device."""
    mean, inv_std = _latent_statistics(vae, raw)
    return (raw - mean) * inv_std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize_latents: what the VAE decodes."""
    mean, inv_std = _latent_statistics(vae, latents)
    return latents / inv_std + mean


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like)
    return mean, 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like)


def load_wan_text_encoder(source: str | Path, torch_dtype: torch.dtype = torch.bfloat16):
    """Return (tokenizer, UMT5 encoder)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    check_wan_folder(source)
    tokenizer = _from_pretrained(AutoTokenizer, source, subfolder="tokenizer")
    encoder = _from_pretrained(UMT5EncoderModel, source, subfolder="text_encoder", dtype=torch_dtype)
    return tokenizer, encoder


def load_wan_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    check_wan_folder(source)
    return _from_pretrained(AutoTokenizer, source, subfolder="tokenizer")


def load_wan_image_encoder(source: str | Path, torch_dtype: torch.dtype = torch.float32):
    """Return (CLIP image processor, CLIP vision encoder), or (None, None) for a family without one (Wan 2.2)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    if not check_wan_folder(source).image_encoder:
        return None, None
    processor = _from_pretrained(CLIPImageProcessor, source, subfolder="image_processor")
    encoder = _from_pretrained(CLIPVisionModel, source, subfolder="image_encoder", dtype=torch_dtype)
    return processor, encoder


def load_blip2(source: str | Path, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Return (Blip2Processor, Blip2ForConditionalGeneration); fp16 on a GPU, float32 on a CPU unless told."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    check_blip2_folder(source)
    device = torch.device(device)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    processor = _from_pretrained(Blip2Processor, source)
    model = _from_pretrained(Blip2ForConditionalGeneration, source, dtype=torch_dtype).to(device).eval()
    return processor, model


def build_wan_14b_transformer(device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                              family: type[ModelFamily] = Wan21I2V):
    """The real 14B I2V transformer architecture (a Wan 2.2 expert for Wan22I2V) with random weights, built
    directly on `device` (benchmarks)."""
    from diffusers import WanTransformer3DModel

    config = WAN_I2V_14B_TRANSFORMER_CONFIG if family.image_encoder else WAN22_I2V_A14B_TRANSFORMER_CONFIG
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.core.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write tiny Wan 2.1 and 2.2 I2V and BLIP-2 folders (random weights, no "
                                            "network)")
    tiny.add_argument("--out", required=True, type=Path, help="folder that receives the two model folders")
    tiny.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("check", help="check that a Wan 2.1 or 2.2 I2V folder (or a BLIP-2 folder) is complete; "
                                         "names the family found or the first missing part")
    check.add_argument("path")
    check.add_argument("--captioner", action="store_true", help="the path is a BLIP-2 folder")
    args = parser.parse_args(argv)

    try:
        if args.command == "make-tiny":
            wan = make_tiny_wan(args.out / TINY_WAN_DIRNAME, seed=args.seed)
            wan22 = make_tiny_wan(args.out / TINY_WAN22_DIRNAME, seed=args.seed, family=Wan22I2V)
            blip = make_tiny_blip2(args.out / TINY_BLIP2_DIRNAME, seed=args.seed)
            print(f"tiny Wan 2.1 I2V pipeline:      {wan}\ntiny Wan 2.2 I2V A14B pipeline: {wan22}\n"
                  f"tiny BLIP-2 captioner:          {blip}")
        elif args.captioner:
            check_blip2_folder(args.path)
            print(f"ok: {args.path} (BLIP-2)")
        else:
            family = check_wan_folder(args.path)
            print(f"ok: {args.path} ({family.title})")
    except ModelFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
