"""diffusion-pipe interop: what the studio does with a file's keys, and the run + dataset pair exported for it.

`notices(run, dataset)` names, once each, the diffusion-pipe keys a file sets that the studio keeps but does not use
(grouped by what the studio does instead) and the values it trains with its nearest equivalent: the
`python -m engine.training.config check` command, the Train tab's import and the trainer's log show them.
`export_for_diffusion_pipe` writes the pair diffusion-pipe runs, and says which studio settings train differently there.

Facts from diffusion-pipe's source (github.com/tdrussell/diffusion-pipe, commit 8f83dbf2, 2026-08-20): train.py
opens `dataset` and joins `output_dir` as written, and utils/dataset.py opens each `[[directory]] path` as written, so
relative paths resolve against the folder diffusion-pipe is started from (its README starts it from its own checkout):
the export writes them absolute. train.py's set_config_defaults refuses an `[adapter] alpha` and sets alpha = rank, so
a `[studio] lora_alpha` other than the rank trains there at another scale.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from engine.core.families import family_of
from engine.core.layout import RunLayout
from engine.training.config import _is_section, _section_fields, save_dataset_config, save_run_config
from engine.training.schema import ADAMW_EQUIVALENTS, OPTIMIZER_TYPES, WAN_BLOCKS, DatasetConfig, RunConfig, _Section

# ---------------------------------------------------------------------------------------------------- notices

def _unused_keys(section: _Section, prefix: str) -> list[tuple[str, str]]:
    """(why, dotted key) for every key of a table (and the tables in it) that the studio reads but does not act on."""
    found = []
    for f in _section_fields(section):
        value = getattr(section, f.name)
        if _is_section(value):
            found += _unused_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, list) and value and all(_is_section(v) for v in value):
            for i, item in enumerate(value):
                found += _unused_keys(item, f"{prefix}{f.name}.{i}.")
        elif f.metadata.get("unused") and section.is_explicit(f.name):
            found.append((f.metadata["unused"], f"{prefix}{f.name}"))
    for key in section.kept:
        rule = section.KEPT.get(key) or section.OTHER_KEYS
        found.append((rule.why, f"{prefix}{key}"))
    return found


def trains_here(optimizer_type: str) -> bool:
    """Whether the studio trains with this diffusion-pipe optimizer name (exactly or as its nearest equivalent)."""
    return optimizer_type.lower() in {*(t.lower() for t in OPTIMIZER_TYPES), *ADAMW_EQUIVALENTS}


def notices(run: RunConfig | None = None, dataset: DatasetConfig | None = None) -> list[str]:
    """Sentences naming each diffusion-pipe key of these configs that the studio keeps but does not use (one sentence
    per reason, each key once), then each value the studio trains with its nearest equivalent or cannot train with."""
    groups: dict[str, list[str]] = {}
    for config in (run, dataset):
        for why, key in _unused_keys(config, "") if config is not None else []:
            groups.setdefault(why, []).append(key)
    out = [f"Not used by the studio (kept for diffusion-pipe): {', '.join(keys)}: {why}."
           for why, keys in groups.items()]
    if run is None:
        return out
    kind = run.optimizer.type
    if kind.lower() in ADAMW_EQUIVALENTS:
        out.append(f"optimizer.type = '{kind}': the studio trains with torch AdamW "
                   f"({ADAMW_EQUIVALENTS[kind.lower()]}).")
    elif not trains_here(kind):
        out.append(f"optimizer.type = '{kind}' is kept for diffusion-pipe, but the studio cannot train with it: set "
                   f"{', '.join(OPTIMIZER_TYPES)} to train here.")
    if run.optimizer.stabilize:
        out.append("optimizer.stabilize = true: the studio's optimizers do not scale their steps down (kept for "
                   "diffusion-pipe).")
    if run.model.transformer_dtype == "float8_e5m2":
        out.append("model.transformer_dtype = 'float8_e5m2': the studio stores the transformer in its float8 (e4m3 "
                   "with a scale per row), the nearest it has.")
    return out


def differences_in_diffusion_pipe(run: RunConfig) -> list[str]:
    """Settings of this run that diffusion-pipe trains differently (it ignores `[studio]`), each with its effect."""
    out = []
    if run.lora_alpha != run.adapter.rank:
        scale = run.lora_alpha / run.adapter.rank
        out.append(f"[studio] lora_alpha = {run.lora_alpha:g} at rank {run.adapter.rank} trains the LoRA at scale "
                   f"{scale:g}; diffusion-pipe forces alpha = rank (scale 1), so there the same file trains at "
                   f"{1 / scale:g}x the studio's scale. No diffusion-pipe setting is equivalent (with Adam a scaled "
                   "learning rate is another run): set lora_alpha to the rank to train the same in both.")
    if run.studio.overlapping_clips:
        out.append("[studio] overlapping_clips: diffusion-pipe trains only the first window of a long clip "
                   "(video_clip_mode = 'single_beginning').")
    if run.studio.float8_matmuls:
        out.append("[studio] float8_matmuls: diffusion-pipe computes in bf16 over the float8 weights (its nearest "
                   "equivalent; slightly different numbers).")
    if run.blocks_to_swap > WAN_BLOCKS - 2:
        out.append(f"blocks_to_swap = {run.blocks_to_swap}: diffusion-pipe swaps at most {WAN_BLOCKS - 2} of Wan 14B's "
                   f"{WAN_BLOCKS} blocks (models/wan/wan.py) and stops there.")
    ckpt = Path(run.model.ckpt_path).expanduser()
    family = family_of(run.model.ckpt_path)
    original = family.hub_id.removesuffix("-Diffusers")  # the original checkpoint diffusion-pipe reads
    if not ckpt.is_dir() or (ckpt / "model_index.json").exists():
        out.append(f"[model] ckpt_path = '{run.model.ckpt_path}' is a diffusers Wan folder or hub id: diffusion-pipe "
                   f"reads the original Wan checkpoint folder (e.g. {original}, downloaded): point ckpt_path there.")
    if len(family.experts) > 1:
        boundary = family.boundary(run.model.ckpt_path)
        trained = [e for e in family.experts if max(e.t_range(boundary)[0], run.model.min_t)
                   < min(e.t_range(boundary)[1], run.model.max_t)]
        ranges = "; ".join(f"`transformer_path = '<{original}>/{e.name}_model'`, min_t = {e.t_range(boundary)[0]:g}, "
                           f"max_t = {e.t_range(boundary)[1]:g}" for e in trained)
        out.append(f"{family.title}: diffusion-pipe trains one expert per run, chosen by [model] transformer_path and "
                   f"kept to its noise levels by min_t / max_t; this run trains {len(trained)} "
                   f"({', '.join(e.name for e in trained)}): in diffusion-pipe run it once per expert with {ranges}.")
    return out


# ----------------------------------------------------------------------------------------------------- export

@dataclass(frozen=True)
class ExportedPair:
    """What `export_for_diffusion_pipe` wrote, and what trains differently in diffusion-pipe."""

    run_toml: Path
    dataset_toml: Path
    notices: list[str]


def _absolute(path: str, base: Path) -> str:
    return str((base / Path(path).expanduser()).resolve())


def export_for_diffusion_pipe(run: RunConfig, dataset: DatasetConfig, out_dir: str | os.PathLike, *,
                              base_dir: str | os.PathLike | None = None) -> ExportedPair:
    """Write `out_dir`/run.toml and `out_dir`/dataset.toml so diffusion-pipe runs them from any working directory.

    Every path the studio resolves is written absolute, as the studio reads it: `output_dir`, `dataset` (the written
    dataset.toml), `[adapter] init_from_existing`, `[studio.samples] image` and each `[[directory]] path` against
    `base_dir` (default: each file's own folder); `[model] ckpt_path` when it names an existing folder (a hub id stays).
    Keys the studio keeps but does not use are written as they were read. Raises ConfigError for a config that cannot
    be saved; OSError when `out_dir` cannot be written.
    """
    run, dataset = copy.deepcopy(run), copy.deepcopy(dataset)
    out_dir = Path(out_dir).expanduser().resolve()
    pair = RunLayout(out_dir)
    run_base = Path(base_dir).expanduser().resolve() if base_dir is not None else run.base_dir
    dataset_base = Path(base_dir).expanduser().resolve() if base_dir is not None else dataset.base_dir
    run.output_dir = _absolute(run.output_dir, run_base)
    run.dataset = str(pair.dataset_toml)
    if run.adapter.init_from_existing:
        run.adapter.init_from_existing = _absolute(run.adapter.init_from_existing, run_base)
    if run.studio.samples.image:
        run.studio.samples.image = _absolute(run.studio.samples.image, run_base)
    if Path(run.model.ckpt_path).expanduser().is_dir():
        run.model.ckpt_path = str(Path(run.model.ckpt_path).expanduser().resolve())
    for directory in dataset.directory:
        directory.path = _absolute(directory.path, dataset_base)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset_toml = save_dataset_config(dataset, pair.dataset_toml)
    run_toml = save_run_config(run, pair.run_toml)
    return ExportedPair(run_toml, dataset_toml, differences_in_diffusion_pipe(run))
