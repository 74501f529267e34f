"""LoRA files for Wan 2.1: save what the trainer made, load what any common tool made, check it fits the model.

We write the diffusion-pipe / ComfyUI layout (`diffusion_model.blocks.{i}.<original Wan module>.lora_A/lora_B.weight`
in `adapter_model.safetensors`, plus a peft-style `adapter_config.json`), because that is what ComfyUI loads without
"lora key not loaded" warnings and what diffusers' `load_lora_weights` converts itself. Like diffusion-pipe we store no
alpha there (its `init_from_existing` refuses any other key and assumes alpha = rank): alpha/rank is folded into
lora_B, which every reader then applies at scale 1. We read that layout, its lora_down/lora_up/.alpha variant,
diffusers/peft names (`transformer.blocks.{i}.attn1.to_q.lora_A.weight`) and the underscore names ComfyUI accepts
for Wan (musubi-tuner's and kohya's `lora_unet_blocks_{i}_self_attn_q`, Wan-Fun's `lora_unet__blocks_...`,
SimpleTuner's `lycoris_blocks_...`). Everything is parsed into one in-memory form (`LoraWeights`, keyed by diffusers
module path) and written back out in whichever format is asked for.

Accelerator (step-distillation) LoRAs such as lightx2v's, CausVid's and AccVid's add what a motion LoRA lacks: LoRAs
on the head and the time/text/image embedders, `.diff_b` bias changes and `.diff` weight changes (on the q/k norms
and the cross-attention norm). Each applies as ComfyUI applies it (comfy/lora.py): W + s*(up@down)*alpha/rank,
b + s*diff_b, W + s*diff at strength s. diffusers' converter agrees except that it drops norm diffs.

Only safetensors are read: a pickled .pt/.ckpt can run code when loaded.

Command line: `python -m engine.generate.lora_files info FILE` and
`python -m engine.generate.lora_files convert IN OUT --format NAME`.
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
from engine.core.layout import ADAPTER_FILE

ADAPTER_CONFIG_FILE = "adapter_config.json"

# Original Wan module name (inside a block) -> diffusers WanTransformer3DModel module name: the Linears LoRAs adapt.
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
# What else accelerator LoRAs change, inside a block (norms, the modulation table) and outside (head, embedders).
# Names from diffusers' Wan checkpoint converter (single_file_utils.convert_wan_transformer_to_diffusers): the
# original norm3 is diffusers' norm2 (the affine cross-attention norm), `modulation` its scale_shift_table.
_BLOCK_EXTRAS = {
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "modulation": "scale_shift_table",
}
_TOP_LEVEL = {
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "patch_embedding": "patch_embedding",
}
_PARAMETERS = ("scale_shift_table",)  # names of a parameter itself (a diff changes it), not of a module


def _any_name(table: dict[str, str]) -> dict[str, str]:
    """Both namings, with dots or (musubi/kohya) underscores -> diffusers name."""
    out = {}
    for original, diffusers_name in table.items():
        for name in (original, diffusers_name):
            out[name] = out[name.replace(".", "_")] = diffusers_name
    return out


_ANY_BLOCK_NAME = _any_name({**_ORIGINAL_TO_DIFFUSERS, **_BLOCK_EXTRAS})
_ANY_TOP_NAME = _any_name(_TOP_LEVEL)
_TO_ORIGINAL = {v: k for k, v in {**_ORIGINAL_TO_DIFFUSERS, **_BLOCK_EXTRAS}.items()}
_TOP_TO_ORIGINAL = {v: k for k, v in _TOP_LEVEL.items()}

# peft `target_modules` regex for the block Linears diffusion-pipe adapts (a plain suffix list such as "net.0.proj"
# would also catch the image embedder's feed-forward outside the blocks).
PEFT_TARGET_MODULES = r"blocks\.\d+\.(" + "|".join(re.escape(n) for n in _DIFFUSERS_TO_ORIGINAL) + ")"

FORMATS = ("diffusion-pipe", "comfy-down-up", "diffusers", "musubi")
_ALPHA_BAKED_FORMATS = ("diffusion-pipe", "diffusers")  # no alpha stored: alpha/rank is folded into lora_B
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
# ComfyUI's underscore prefixes for Wan: kohya/musubi `lora_unet_`, Wan-Fun `lora_unet__`, SimpleTuner `lycoris_`.
_UNDERSCORE_PREFIX = re.compile(r"^(?:lora_unet__?|lycoris_)")
# <module>.<part>: LoRA halves (peft may add an adapter name), alpha, and ComfyUI's weight/bias diffs; diffusers
# stores a diff_b beside a LoRA as lora_B.bias.
_PART = re.compile(r"^(.+?)\.(?:(lora_A|lora_B|lora_down|lora_up)(?:\.[\w\-]+)?\.(weight|bias)|(alpha|diff|diff_b))$")
_PART_NAMES = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not look like a Wan 2.1 LoRA; the message says which file and keys."""


class LoraMismatchError(ValueError):
    """A LoRA whose modules or shapes do not fit the loaded transformer (made for another model or size)."""


def wan_module_names() -> dict[str, str]:
    """Original Wan block module names -> diffusers names (e.g. 'self_attn.o' -> 'attn1.to_out.0')."""
    return dict(_ORIGINAL_TO_DIFFUSERS)


def to_original_module(diffusers_path: str) -> str:
    """'blocks.3.attn1.to_q' -> 'blocks.3.self_attn.q', 'proj_out' -> 'head.head'; KeyError for unknown modules."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", diffusers_path)
    if match and match.group(2) in _TO_ORIGINAL:
        return f"blocks.{match.group(1)}.{_TO_ORIGINAL[match.group(2)]}"
    if diffusers_path in _TOP_TO_ORIGINAL:
        return _TOP_TO_ORIGINAL[diffusers_path]
    raise KeyError(diffusers_path)


def _to_diffusers_path(name: str) -> str | None:
    """A module name in any naming ('blocks.0.self_attn.q', 'blocks_0_attn1_to_q', 'head.head') -> diffusers path."""
    match = re.fullmatch(r"blocks[._](\d+)[._](.+)", name)
    if match:
        inner = _ANY_BLOCK_NAME.get(match.group(2))
        return f"blocks.{match.group(1)}.{inner}" if inner else None
    return _ANY_TOP_NAME.get(name)


def _diff_target(module: str, part: str) -> str:
    """The parameter a `.diff` / `.diff_b` of `module` changes (diffusers path)."""
    if part == "diff_b":
        return f"{module}.bias"
    return module if module.rsplit(".", 1)[-1] in _PARAMETERS else f"{module}.weight"


def _original_parameter(parameter: str) -> str:
    """'blocks.0.attn1.norm_q.weight' -> 'blocks.0.self_attn.norm_q.diff' (the key ComfyUI reads for that change)."""
    if parameter.rsplit(".", 1)[-1] in _PARAMETERS:
        return f"{to_original_module(parameter)}.diff"
    module, kind = parameter.rsplit(".", 1)
    return f"{to_original_module(module)}.{'diff_b' if kind == 'bias' else 'diff'}"


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
    """A LoRA for the Wan transformer in one neutral form, keyed by diffusers module path ('blocks.0.attn1.to_q').

    `diffs` holds the direct changes accelerator LoRAs carry, keyed by diffusers parameter path
    ('blocks.0.attn1.to_q.bias', 'blocks.0.norm2.weight'): at strength s the parameter becomes p + s*diff.
    """

    modules: dict[str, LoraModule]
    source_format: str = "diffusion-pipe"
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def alpha(self) -> float:
        """The most common alpha (alpha = rank where a module stores none)."""
        counts = Counter(m.alpha if m.alpha is not None else m.rank for m in self.modules.values())
        return counts.most_common(1)[0][0] if counts else 0.0

    @property
    def num_blocks(self) -> int:
        blocks = [int(name.split(".")[1]) for name in [*self.modules, *self.diffs] if name.startswith("blocks.")]
        return 1 + max(blocks, default=-1)

    @property
    def accelerator_parts(self) -> list[str]:
        """What only ComfyUI's layout holds: LoRAs outside the blocks and weight/bias diffs, in original names."""
        outside = [to_original_module(n) for n in self.modules if not n.startswith("blocks.")]
        return outside + [_original_parameter(p) for p in self.diffs]

    def to_diffusers_peft(self, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
        """Names for diffusers' `load_lora_weights` (it assumes lora_alpha = rank): alpha/rank is baked into lora_B.
        The diffs are not included: peft has no place for a norm's change (see `diffs`)."""
        out = {}
        for name, m in self.modules.items():
            out[f"{prefix}{name}.lora_A.weight"] = m.down
            out[f"{prefix}{name}.lora_B.weight"] = m.baked_up
        return out

    def state_dict(self, fmt: str = "diffusion-pipe") -> dict[str, torch.Tensor]:
        """The tensors under the key names of `fmt` (one of FORMATS). Raises LoraFileError when `fmt` cannot hold
        an accelerator LoRA's parts (only comfy-down-up, ComfyUI's own layout, holds them all)."""
        if fmt not in FORMATS:
            raise ValueError(f"Unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}.")
        extra = self.accelerator_parts
        if extra and fmt != "comfy-down-up":
            raise LoraFileError(f"This LoRA changes {_key_list(extra, 4)}, which the {fmt} format cannot hold "
                                "(its readers load block LoRAs only). Use --format comfy-down-up.")
        if fmt == "diffusers":
            return self.to_diffusers_peft()
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
        for parameter, diff in self.diffs.items():
            out[f"diffusion_model.{_original_parameter(parameter)}"] = diff
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
    """key -> (diffusers module path, 'down' | 'up' | 'alpha' | 'diff' | 'diff_b'), or None when the key names no
    Wan transformer part."""
    underscored = _UNDERSCORE_PREFIX.match(key)
    match = _PART.match(key[underscored.end():] if underscored else _strip_prefixes(key))
    if not match:
        return None
    name, half, kind, other = match.groups()
    if half:
        if kind == "bias" and half != "lora_B":
            return None
        part = "diff_b" if kind == "bias" else _PART_NAMES[half]
    else:
        part = other
    module = _to_diffusers_path(name)
    return (module, part) if module else None


def _detect_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(_UNDERSCORE_PREFIX.match(k) for k in keys):
        return "musubi"
    originals = tuple(f".{name}." for name in (*_ORIGINAL_TO_DIFFUSERS, *_BLOCK_EXTRAS, *_TOP_LEVEL))
    if any(k.endswith((".diff", ".diff_b")) or any(o in f".{k}" for o in originals) for k in keys):
        return "comfy-down-up" if any(".lora_down." in k or k.endswith(".diff_b") for k in keys) else "diffusion-pipe"
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
            "such as LoHa/LoKr or DoRA). Use a Wan 2.1 LoRA in the diffusion-pipe/ComfyUI, diffusers or "
            "musubi-tuner format."
        )
    modules, diffs = {}, {}
    for name, p in sorted(parts.items(), key=lambda kv: _module_sort_key(kv[0])):
        for kind in ("diff", "diff_b"):
            if kind in p:
                diffs[_diff_target(name, kind)] = p[kind]
        if "down" not in p and "up" not in p:
            continue
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
    return LoraWeights(modules=modules, source_format=_detect_format(state.keys()), diffs=diffs)


def _module_sort_key(name: str) -> tuple[int, int, int]:
    """Blocks in order, each module in the original order; then the modules outside the blocks."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not match:
        order = list(_TOP_TO_ORIGINAL)
        return 1, 0, order.index(name) if name in order else len(order)
    order = list(_TO_ORIGINAL)
    module = match.group(2)
    return 0, int(match.group(1)), order.index(module) if module in order else len(order)


# ---------------------------------------------------------------------------------------------- files

def resolve_lora_file(path: str | Path) -> Path:
    """The LoRA file `path` names: the file itself, or a folder's adapter_model.safetensors (a diffusion-pipe or
    studio epoch folder) or its only .safetensors file. Raises LoraFileError saying what is there instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if (path / ADAPTER_FILE).is_file():
            path = path / ADAPTER_FILE
        elif len(found) == 1:
            path = found[0]
        else:
            what = f"{len(found)} .safetensors files" if found else "no .safetensors file"
            raise LoraFileError(f"{path} is a folder with {what} and no {ADAPTER_FILE}: give the LoRA file itself.")
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

    path = resolve_lora_file(path)
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
              metadata: Mapping[str, object] | None = None, file_name: str = ADAPTER_FILE) -> Path:
    """Save a peft-named LoRA state dict as out_dir/`file_name` (diffusion-pipe/ComfyUI keys) + adapter_config.json.

    `file_name` is adapter_model.safetensors (diffusion-pipe's name) unless a Wan 2.2 expert's file is written
    (high_noise_model.safetensors / low_noise_model.safetensors: engine.core.families).

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
    file = save_lora_file(weights, out_dir / file_name, "diffusion-pipe", metadata={
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


def _parameter_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape, seen through peft wrappers ('blocks.0.attn1.to_q.bias', 'blocks.0.norm2.weight')."""
    model = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    return {name.replace(".base_layer.", "."): tuple(p.shape) for name, p in model.named_parameters()
            if ".lora_" not in name}


def check_keys_match_model(lora: LoraWeights | Mapping[str, torch.Tensor] | Iterable[str],
                           transformer: torch.nn.Module) -> None:
    """Raise LoraMismatchError naming the keys that map to no module of `transformer` or whose shapes differ.

    `lora` may be parsed weights, a state dict in any supported format, or bare key names (names checked only).
    """
    if isinstance(lora, LoraWeights):
        modules, diffs = lora.modules, lora.diffs
    elif isinstance(lora, Mapping):
        parsed_weights = parse_lora_state(lora)
        modules, diffs = parsed_weights.modules, parsed_weights.diffs
    else:
        modules, diffs = {}, {}
        for key in lora:
            parsed = _parse_key(key)
            if parsed is None:
                raise LoraMismatchError(f"LoRA key {key} names no Wan 2.1 transformer module.")
            if parsed[1] in ("diff", "diff_b"):
                diffs[_diff_target(*parsed)] = None
            else:
                modules[parsed[0]] = None
    shapes = _linear_shapes(transformer)
    parameters = _parameter_shapes(transformer)
    missing = [to_original_module(n) for n in modules if n not in shapes]
    missing += [_original_parameter(n) for n in diffs if n not in parameters]
    wrong = []
    for name, m in modules.items():
        if m is None or name not in shapes:
            continue
        want_out, want_in = shapes[name]
        if m.down.shape[1] != want_in or m.up.shape[0] != want_out:
            wrong.append(f"{to_original_module(name)} (LoRA {m.up.shape[0]}x{m.down.shape[1]}, "
                         f"model {want_out}x{want_in})")
    for name, diff in diffs.items():
        if diff is not None and name in parameters and tuple(diff.shape) != parameters[name]:
            wrong.append(f"{_original_parameter(name)} (LoRA {tuple(diff.shape)}, model {parameters[name]})")
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
                              "diffs": len(weights.diffs),
                              "outside_blocks": [to_original_module(n) for n in weights.modules
                                                 if not n.startswith("blocks.")],
                              "metadata": weights.metadata}, indent=2))
        else:
            print(save_lora_file(weights, args.dst, args.format))
    except LoraFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
