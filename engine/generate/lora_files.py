"""LoRA files for Wan 2.1: save what the trainer made, load what any common tool made, check it fits the model.

We write the diffusion-pipe / ComfyUI layout (`diffusion_model.blocks.{i}.<original Wan module>.lora_A/lora_B.weight`
in `adapter_model.safetensors`, plus a peft-style `adapter_config.json`), because that is what ComfyUI loads without
"lora key not loaded" warnings and what diffusers' `load_lora_weights` converts itself. Like diffusion-pipe we store no
alpha there (its `init_from_existing` refuses any other key and assumes alpha = rank): alpha/rank is folded into
lora_B, which every reader then applies at scale 1. We read that layout, its
lora_down/lora_up/.alpha variant, diffusers/peft names (`transformer.blocks.{i}.attn1.to_q.lora_A.weight`) and
musubi-tuner's `lora_unet_blocks_{i}_self_attn_q.lora_down.weight`. Everything is parsed into one in-memory form
(`LoraWeights`, keyed by diffusers module path) and written back out in whichever format is asked for.

Only safetensors are read: a pickled .pt/.ckpt can run code when loaded.

Command line: `python -m engine.generate.lora_files info FILE` and `python -m engine.generate.lora_files convert IN OUT --format NAME`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from engine.core.files import atomic_path, atomic_write_json

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# Original Wan module name (inside a block) -> diffusers WanTransformer3DModel module name.
_ORIGINAL_TO_DIFFUSERS: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_DIFFUSERS_TO_ORIGINAL = {v: k for k, v in _ORIGINAL_TO_DIFFUSERS.items()}
# Names as they appear in a block, in either naming, with dots or (musubi/kohya) underscores -> diffusers name.
_ANY_NAME_TO_DIFFUSERS: dict[str, str] = {}
for _orig, _diff in _ORIGINAL_TO_DIFFUSERS.items():
    for _name in (_orig, _diff):
        _ANY_NAME_TO_DIFFUSERS[_name] = _diff
        _ANY_NAME_TO_DIFFUSERS[_name.replace(".", "_")] = _diff

# peft `target_modules` regex for the block Linears diffusion-pipe adapts (a plain suffix list such as "net.0.proj"
# would also catch the image embedder's feed-forward outside the blocks).
PEFT_TARGET_MODULES = r"blocks\.\d+\.(" + "|".join(re.escape(n) for n in _DIFFUSERS_TO_ORIGINAL) + ")"

FORMATS = ("diffusion-pipe", "comfy-down-up", "diffusers", "musubi")
_ALPHA_BAKED_FORMATS = ("diffusion-pipe", "diffusers")  # no alpha stored: alpha/rank is folded into lora_B
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
_DOTTED_WEIGHT = re.compile(r"^blocks\.(\d+)\.(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.([\w\-]+))?\.weight$")
_DOTTED_ALPHA = re.compile(r"^blocks\.(\d+)\.(.+)\.alpha$")
_UNDERSCORE = re.compile(r"^lora_unet_blocks_(\d+)_(\w+?)\.(?:(lora_down|lora_up)\.weight|(alpha))$")


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not look like a Wan 2.1 LoRA; the message says which file and keys."""


class LoraMismatchError(ValueError):
    """A LoRA whose modules or shapes do not fit the loaded transformer (made for another model or size)."""


def wan_module_names() -> dict[str, str]:
    """Original Wan block module names -> diffusers names (e.g. 'self_attn.o' -> 'attn1.to_out.0')."""
    return dict(_ORIGINAL_TO_DIFFUSERS)


def to_original_module(diffusers_path: str) -> str:
    """'blocks.3.attn1.to_q' -> 'blocks.3.self_attn.q'; raises KeyError for modules without an original name."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", diffusers_path)
    if not match or match.group(2) not in _DIFFUSERS_TO_ORIGINAL:
        raise KeyError(diffusers_path)
    return f"blocks.{match.group(1)}.{_DIFFUSERS_TO_ORIGINAL[match.group(2)]}"


@dataclass
class LoraModule:
    """One adapted Linear: down [rank, in], up [out, rank]; alpha None means alpha = rank (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def baked_up(self) -> torch.Tensor:
        """up with alpha/rank folded in, for formats whose readers assume alpha = rank."""
        return self.up * self.scale if self.scale != 1 else self.up


@dataclass
class LoraWeights:
    """A LoRA for the Wan transformer in one neutral form, keyed by diffusers module path ('blocks.0.attn1.to_q')."""

    modules: dict[str, LoraModule]
    source_format: str = "diffusion-pipe"
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        """The most common alpha (alpha = rank where a module stores none)."""
        return Counter(m.alpha if m.alpha is not None else m.rank for m in self.modules.values()).most_common(1)[0][0]

    @property
    def num_blocks(self) -> int:
        return 1 + max(int(name.split(".")[1]) for name in self.modules)

    def to_diffusers_peft(self, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
        """Names for diffusers' `load_lora_weights` (it assumes lora_alpha = rank): alpha/rank is baked into lora_B."""
        out = {}
        for name, m in self.modules.items():
            out[f"{prefix}{name}.lora_A.weight"] = m.down
            out[f"{prefix}{name}.lora_B.weight"] = m.baked_up
        return out

    def state_dict(self, fmt: str = "diffusion-pipe") -> dict[str, torch.Tensor]:
        """The tensors under the key names of `fmt` (one of FORMATS)."""
        if fmt == "diffusers":
            return self.to_diffusers_peft()
        if fmt not in FORMATS:
            raise ValueError(f"Unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}.")
        out = {}
        for name, m in self.modules.items():
            original = to_original_module(name)
            if fmt == "diffusion-pipe":  # no alpha key: diffusion-pipe's loader refuses one and assumes alpha = rank
                base = f"diffusion_model.{original}"
                out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = m.down, m.baked_up
            else:  # comfy-down-up or musubi: lora_down/lora_up with an alpha for every module
                base = f"diffusion_model.{original}" if fmt == "comfy-down-up" else (
                    "lora_unet_" + original.replace(".", "_"))
                out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"] = m.down, m.up
                out[f"{base}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
        return out


# ---------------------------------------------------------------------------------------------- parsing

def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _parse_key(key: str) -> tuple[str, str] | None:
    """key -> (diffusers module path, 'down' | 'up' | 'alpha'), or None when the key names no Wan LoRA part."""
    match = _UNDERSCORE.match(key)
    if match:
        block, name, kind, alpha = match.groups()
        module = _ANY_NAME_TO_DIFFUSERS.get(name)
        part = "alpha" if alpha else ("down" if kind == "lora_down" else "up")
        return (f"blocks.{block}.{module}", part) if module else None
    key = _strip_prefixes(key)
    match = _DOTTED_WEIGHT.match(key)
    if match:
        block, name, kind, _adapter = match.groups()
        module = _ANY_NAME_TO_DIFFUSERS.get(name)
        return (f"blocks.{block}.{module}", "down" if kind in ("lora_A", "lora_down") else "up") if module else None
    match = _DOTTED_ALPHA.match(key)
    if match:
        module = _ANY_NAME_TO_DIFFUSERS.get(match.group(2))
        return (f"blocks.{match.group(1)}.{module}", "alpha") if module else None
    return None


def _detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(".self_attn." in k or ".cross_attn." in k or ".ffn.0." in k or ".ffn.2." in k for k in keys):
        return "comfy-down-up" if any(".lora_down." in k for k in keys) else "diffusion-pipe"
    return "diffusers"


def _key_list(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def parse_lora_state(state: Mapping[str, torch.Tensor], *, default_alpha: float | None = None,
                     source: str = "state dict") -> LoraWeights:
    """Parse tensors in any supported format; `default_alpha` applies to modules whose file stores no alpha."""
    if not state:
        raise LoraFileError(f"{source} holds no tensors: it is not a LoRA.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
        else:
            parts.setdefault(parsed[0], {})[parsed[1]] = tensor
    if unknown:
        raise LoraFileError(
            f"{source}: {len(unknown)} of {len(state)} keys name no Wan 2.1 transformer LoRA module: "
            f"{_key_list(unknown)}. This looks like a LoRA for another model (or a LoRA type we do not support, "
            "such as LoHa/LoKr, DoRA or bias diffs). Use a Wan 2.1 LoRA in the diffusion-pipe/ComfyUI, diffusers "
            "or musubi-tuner format."
        )
    modules = {}
    for name, p in sorted(parts.items(), key=lambda kv: _module_sort_key(kv[0])):
        if "down" not in p or "up" not in p:
            missing = "lora_A/lora_down" if "down" not in p else "lora_B/lora_up"
            raise LoraFileError(f"{source}: module {to_original_module(name)} has no {missing} weight; the file is "
                                "incomplete. Re-save or re-download it.")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFileError(
                f"{source}: module {to_original_module(name)} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                "which do not form a rank-r pair ([r, in] and [out, r]). The file is damaged or of another layout."
            )
        alpha = float(p["alpha"].item()) if "alpha" in p else default_alpha
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraWeights(modules=modules, source_format=_detect_format(state.keys()))


def _module_sort_key(name: str) -> tuple[int, int]:
    block, module = name.split(".", 2)[1:]
    order = list(_DIFFUSERS_TO_ORIGINAL)
    return int(block), order.index(module) if module in order else len(order)


# ---------------------------------------------------------------------------------------------- files

def _resolve_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise LoraFileError(f"LoRA file not found: {path}.")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{path.name}: only .safetensors LoRA files are accepted (pickled .pt/.ckpt/.bin files can run code "
            "when loaded). Convert it with the tool that made it, or ask its author for a safetensors file."
        )
    return path


def _alpha_from_side_files(path: Path, metadata: dict[str, str]) -> float | None:
    """peft-style files keep alpha outside the tensors: in diffusers' metadata or in adapter_config.json beside."""
    if "lora_adapter_metadata" in metadata:
        try:  # a model's save_lora_adapter writes `lora_alpha`, a pipeline's save_lora_weights `transformer.lora_alpha`
            adapter = json.loads(metadata["lora_adapter_metadata"])
            return float(adapter.get("lora_alpha", adapter.get("transformer.lora_alpha")))
        except (ValueError, TypeError, AttributeError):
            pass
    config = path.parent / ADAPTER_CONFIG_FILE
    if config.exists():
        try:
            return float(json.loads(config.read_text(encoding="utf-8"))["lora_alpha"])
        except (ValueError, KeyError, TypeError):
            pass
    return None


def load_lora(path: str | Path) -> LoraWeights:
    """Read a Wan 2.1 LoRA (.safetensors file, or a folder with adapter_model.safetensors) in any supported format."""
    from safetensors import SafetensorError, safe_open

    path = _resolve_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFileError(
            f"{path} is not a readable safetensors file ({err}). It may be truncated or corrupt: copy or download "
            "it again."
        ) from err
    # Alphas travel as `.alpha` tensors except in peft-style files, which keep lora_alpha beside the tensors.
    default_alpha = None
    if _detect_format(state) == "diffusers" and metadata.get("alpha_baked") != "true":
        default_alpha = _alpha_from_side_files(path, metadata)
    weights = parse_lora_state(state, default_alpha=default_alpha, source=str(path))
    weights.metadata, weights.path = metadata, path
    return weights


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file(cpu, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def save_lora_file(weights: LoraWeights, path: str | Path, fmt: str = "diffusion-pipe",
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write `weights` as one .safetensors file in `fmt` (one of FORMATS), atomically."""
    path = Path(path)
    source = metadata if metadata is not None else weights.metadata
    meta = {**{k: str(v) for k, v in source.items() if k != "alpha_baked"},
            "format": "pt", "lora_format": fmt, "rank": str(weights.rank), "alpha": f"{weights.alpha:g}"}
    if fmt in _ALPHA_BAKED_FORMATS:  # `alpha` is in lora_B already: readers must not apply it again
        meta["alpha_baked"] = "true"
    _write_safetensors(weights.state_dict(fmt), path, meta)
    return path


def save_lora(peft_state: Mapping[str, torch.Tensor], out_dir: str | Path, *, rank: int, alpha: float,
              metadata: Mapping[str, object] | None = None) -> Path:
    """Save a peft-named LoRA state dict as out_dir/adapter_model.safetensors (diffusion-pipe/ComfyUI keys) + config.

    Keys may carry `base_model.model.` / `transformer.` prefixes and peft's adapter name (`lora_A.default.weight`).
    `metadata` (base model, steps, dataset fingerprint, ...) is stored in the safetensors header as strings.
    Returns the path of the .safetensors file.
    """
    out_dir = Path(out_dir)
    weights = parse_lora_state(peft_state, default_alpha=float(alpha), source="the LoRA state to save")
    ranks = sorted({m.rank for m in weights.modules.values()})
    if ranks != [rank]:
        raise ValueError(f"save_lora was told rank={rank} but the state dict holds rank(s) {ranks}.")
    for m in weights.modules.values():
        m.alpha = float(alpha)
    file = save_lora_file(weights, out_dir / ADAPTER_FILE, "diffusion-pipe", metadata={
        k: str(v) for k, v in (metadata or {}).items()})
    target_modules = sorted({_DIFFUSERS_TO_ORIGINAL[n.split(".", 2)[2]] for n in weights.modules})
    atomic_write_json(out_dir / ADAPTER_CONFIG_FILE, {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,  # what the saved tensors mean: alpha/rank is already in lora_B, as diffusion-pipe assumes
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": str((metadata or {}).get("base_model", "")),
    })
    return file


# ---------------------------------------------------------------------------------------------- model check

def _linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (out_features, in_features) for every Linear-like module, seen through peft wrappers."""
    model = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    shapes = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            shapes[name] = (int(base.out_features), int(base.in_features))
    return shapes


def check_keys_match_model(lora: LoraWeights | Mapping[str, torch.Tensor] | Iterable[str],
                           transformer: torch.nn.Module) -> None:
    """Raise LoraMismatchError naming the keys that map to no module of `transformer` or whose shapes differ.

    `lora` may be parsed weights, a state dict in any supported format, or bare key names (names checked only).
    """
    if isinstance(lora, LoraWeights):
        modules = lora.modules
    elif isinstance(lora, Mapping):
        modules = parse_lora_state(lora).modules
    else:
        names = {}
        for key in lora:
            parsed = _parse_key(key)
            if parsed is None:
                raise LoraMismatchError(f"LoRA key {key} names no Wan 2.1 transformer module.")
            names[parsed[0]] = None
        modules = names
    shapes = _linear_shapes(transformer)
    missing = [to_original_module(n) for n in modules if n not in shapes]
    wrong = []
    for name, m in modules.items():
        if m is None or name not in shapes:
            continue
        want_out, want_in = shapes[name]
        if m.down.shape[1] != want_in or m.up.shape[0] != want_out:
            wrong.append(f"{to_original_module(name)} (LoRA {m.up.shape[0]}x{m.down.shape[1]}, "
                         f"model {want_out}x{want_in})")
    if missing or wrong:
        blocks = sum(1 for n in shapes if re.fullmatch(r"blocks\.\d+", n))
        parts = []
        if missing:
            parts.append(f"{len(missing)} modules do not exist in this transformer ({blocks} blocks): "
                         f"{_key_list(missing)}")
        if wrong:
            parts.append(f"{len(wrong)} modules have other shapes: {_key_list(wrong, 4)}")
        raise LoraMismatchError(
            "This LoRA was made for another model: " + "; ".join(parts) + ". Use a LoRA trained on the same Wan 2.1 "
            "I2V model (14B 480p) as the one loaded."
        )


# ---------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.generate.lora_files", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a LoRA file's format, rank, alpha, modules and metadata")
    info.add_argument("path", type=Path)
    convert = sub.add_parser("convert", help="rewrite a LoRA file in another key format")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--format", choices=FORMATS, default="diffusion-pipe")
    args = parser.parse_args(argv)
    try:
        weights = load_lora(args.path if args.command == "info" else args.src)
        if args.command == "info":
            print(json.dumps({"path": str(weights.path), "format": weights.source_format, "rank": weights.rank,
                              "alpha": weights.alpha, "blocks": weights.num_blocks, "modules": len(weights.modules),
                              "metadata": weights.metadata}, indent=2))
        else:
            print(save_lora_file(weights, args.dst, args.format))
    except LoraFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
