"""Run and dataset configuration files: reading and writing diffusion-pipe-compatible TOML.

A run TOML holds diffusion-pipe's keys (top level, `[model]`, `[adapter]`, `[optimizer]`, `[monitoring]`) plus our
own extras in a `[studio]` table, so a file exported from the studio stays a diffusion-pipe file. A diffusion-pipe key
only ever holds a value diffusion-pipe accepts, with diffusion-pipe's meaning; a studio mode that goes further is a
`[studio]` switch refining one such value (e.g. `transformer_dtype = 'float8'` + `[studio] float8_matmuls = true`), so
diffusion-pipe runs the same file with its nearest equivalent. A dataset TOML holds the bucket settings and
`[[directory]]` entries.

Every key diffusion-pipe reads for a Wan run is accepted (see engine.training.schema for the list and its source): keys
the studio does not use are kept, written back unchanged, and named by engine.training.interop.notices. An unknown key
is an error naming the file, with a "did you mean" only for a near-match (a typo, or the key of another table).

Earlier studio versions wrote their own values into diffusion-pipe keys ('float8_compute', 'selective',
'multiple_overlapping'), kept `compile` and the timestep shift under `[studio]`, and wrote a cosine schedule as
`lr_scheduler = 'linear'` + `[studio] cosine_schedule = true`: such files (runs to resume) still load and are written
back in the current form (`lr_scheduler = 'cosine'`, which is diffusion-pipe's cosine schedule).

Every field carries `metadata["help"]` (unit, range, why); the Train tab builds its form from `describe_fields` and
applies edits with `apply_overrides`, both of which validate exactly like loading a file does.

Round trip: loading remembers which keys the file set; saving writes those keys, the required keys and any value that
differs from its default, so a file read and written again has the same keys and values, and nothing else.

Command line: `python -m engine.training.config check RUN.toml` prints the notices and the resolved run and dataset
configs, or the error; `python -m engine.training.config export RUN.toml OUT_DIR` writes the pair for diffusion-pipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from engine.core.files import TextFileError, atomic_write_text, read_text
from engine.training.schema import ConfigError, DatasetConfig, DirectoryConfig, RunConfig, _Section

# ------------------------------------------------------------------------------------------------- validation

# Studio modes that refine a value of a diffusion-pipe key (which diffusion-pipe then runs as that value):
# ([studio] switch, diffusion-pipe key, the values it refines, what earlier studio versions wrote into that key).
_REFINEMENTS = (
    ("float8_matmuls", "model.transformer_dtype", ("float8", "float8_e4m3fn", "float8_e5m2"), "float8_compute"),
    ("selective_checkpointing", "activation_checkpointing", (True,), "selective"),
    ("overlapping_clips", "video_clip_mode", ("single_beginning",), "multiple_overlapping"),
)


# What earlier studio versions wrote, read as what it meant: its own values in diffusion-pipe keys, and keys it kept
# under [studio] that diffusion-pipe has with the same meaning.
_LEGACY_VALUES = {(key, old): {key: refined[0], f"studio.{switch}": True} for switch, key, refined, old in _REFINEMENTS}


_MOVED_KEYS = {"studio.compile": "compile", "studio.timestep_shift": "model.shift"}


# `[studio] cosine_schedule = true` refined lr_scheduler = 'linear' into a cosine: diffusion-pipe's own 'cosine' now.
_COSINE_SWITCH = ("studio", "cosine_schedule")


def _where(file: Path | str | None) -> str:
    return f" in {file}" if file else ""


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        return f"list of {_type_name(args[0])}" if args else "list"
    if hint is list:
        return "list"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(hint, getattr(hint, "__name__",
                                                                                               str(hint)))


def _check_bucket_list(key: str, value: Any, file, *, pairs_ok: bool, integer: bool) -> list:
    """resolutions / ar_buckets: numbers, or [w, h] pairs of positive integers."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"'{key}'{_where(file)} must be a non-empty list, got {value!r}.")
    out = []
    for item in value:
        if pairs_ok and isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item):
                raise ConfigError(f"'{key}'{_where(file)}: {item!r} must be a [width, height] pair of positive "
                                  "integers.")
            out.append([int(v) for v in item])
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0 and (
                not integer or float(item).is_integer()):
            out.append(int(item) if integer else float(item) if isinstance(item, float) else item)
        else:
            kind = "positive integer" if integer else "positive number"
            raise ConfigError(f"'{key}'{_where(file)}: {item!r} must be a {kind}"
                              + (" or a [width, height] pair." if pairs_ok else "."))
    return out


def _coerce(value: Any, hint: Any, key: str, file) -> Any:
    """Check `value` against a type hint, converting only where no information is lost (int -> float)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, file)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}'{_where(file)} must be {_type_name(hint)}, got {value!r}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # a UI number box gives 3.0 for 3
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is list:
        if isinstance(value, (list, tuple)):
            (item_hint,) = typing.get_args(hint)
            try:
                return [_coerce(v, item_hint, key, file) for v in value]
            except ConfigError:
                pass
    elif hint is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"'{key}'{_where(file)} must be {_type_name(hint)}, got {value!r}.")


def _check_value(section: Any, name: str, value: Any, key: str, file) -> Any:
    """Validate one value for field `name` of a section instance; return the value to store."""
    f = section.__dataclass_fields__[name]
    hint = typing.get_type_hints(type(section))[name]
    meta = f.metadata
    if name in ("resolutions", "ar_buckets") and value is not None:
        return _check_bucket_list(key, value, file, pairs_ok=True, integer=name == "resolutions")
    if value is None and not (isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)):
        raise ConfigError(f"'{key}'{_where(file)} cannot be unset: {meta['help']}")
    value = _coerce(value, hint, key, file)
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None:
        accepted = (*choices, *meta.get("also", ()))
        matches = [c for c in accepted if c == value and type(c) is type(value) or (
            meta.get("ignore_case") and isinstance(c, str) and isinstance(value, str) and c.lower() == value.lower())]
        pattern = meta.get("also_matching")
        if not matches and not (pattern and isinstance(value, str) and re.fullmatch(pattern, value)):
            allowed = ", ".join(_toml_literal(c) for c in accepted)
            texts = [c for c in accepted if isinstance(c, str)]
            near = _near_matches(value, texts) if isinstance(value, str) else []
            hint = f" Did you mean {_toml_literal(near[0])}?" if near else ""
            other = " or a pytorch_optimizer class name (e.g. 'Prodigy')" if pattern else ""
            raise ConfigError(f"'{key}'{_where(file)} is {_toml_literal(value)};{hint} allowed values: {allowed}"
                              f"{other}.")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        low, high = meta.get("minimum"), meta.get("maximum")
        if (low is not None and item < low) or (high is not None and item > high):
            span = f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"
            raise ConfigError(f"'{key}'{_where(file)} is {item!r}, outside the range {span}: {meta['help']}")
    return value


def _toml_literal(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def _section_fields(section: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section) if not f.metadata.get("internal")]


def _is_section(value: Any) -> bool:
    return isinstance(value, _Section)


# ------------------------------------------------------------------------------------------- keys and near-matches

def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap of neighbours) that turn `a` into `b` (optimal string alignment)."""
    previous, row = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        before, previous, row = previous, row, [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb))
            if before is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, before[j - 2] + 1)
            row.append(cost)
    return row[-1]


def _near_matches(word: str, candidates: list[str]) -> list[str]:
    """The candidates a typo away from `word`, closest first: equal but for case and '-' / '_', or within one edit per
    five characters (one edit for shorter words). 'transformer_path' is not a typo of 'transformer_dtype'."""
    def plain(text: str) -> str:
        return text.lower().replace("-", "_")

    allowed = max(1, len(word) // 5)
    scored = sorted((_edits(plain(word), plain(c)), c) for c in candidates)
    return [c for distance, c in scored if distance <= allowed]


def _accepted_keys(section: _Section) -> list[str]:
    """The keys a table accepts: its fields (nested tables included) and the diffusion-pipe keys it keeps."""
    return [f.name for f in _section_fields(section)] + list(section.KEPT)


def _tables(root: _Section) -> list[tuple[str, str, _Section]]:
    """(how a message names the table, dotted prefix, an instance) for the root table and every table in it."""
    out = [("the top level", "", root)]

    def walk(section: _Section, prefix: str) -> None:
        for f in _section_fields(section):
            value = getattr(section, f.name)
            if _is_section(value):
                out.append((f"[{prefix}{f.name}]", f"{prefix}{f.name}.", value))
                walk(value, f"{prefix}{f.name}.")

    walk(root, "")
    if isinstance(root, DatasetConfig):
        out.append(("[[directory]]", "directory.N.", DirectoryConfig()))
    return out


def _unknown_key(section: _Section, key: str, prefix: str, file, root: _Section) -> str | None:
    """The error for a key the table does not accept, or None where the table keeps any other key (and this one is
    neither a typo of its own keys nor a key of another table)."""
    dotted = f"{prefix}{key}"
    if key in section.REFUSED:
        return f"'{dotted}'{_where(file)}: {section.REFUSED[key]}"
    own = _accepted_keys(section)
    here = _near_matches(key, own)
    if here:
        return f"Unknown key '{dotted}'{_where(file)}. Did you mean '{prefix}{here[0]}'?"
    elsewhere = [(table, name) for table, _, other in _tables(root) if other is not section
                 for name in _near_matches(key, _accepted_keys(other))
                 if section.OTHER_KEYS is None or name == key]
    if elsewhere:
        table, name = elsewhere[0]
        place = "at the top level" if table == "the top level" else f"in {table}"
        return f"Unknown key '{dotted}'{_where(file)}. Did you mean '{name}' {place}?"
    if section.OTHER_KEYS is not None:
        return None
    table = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
    return f"Unknown key '{dotted}'{_where(file)}. Keys allowed in {table}: {', '.join(own)}."


def _set_kept(section: _Section, key: str, value: Any, dotted: str, file) -> None:
    """Check a kept key's value against the type diffusion-pipe takes and keep it as written (None removes it)."""
    if value is None:
        section.kept.pop(key, None)
        return
    rule = section.KEPT.get(key) or section.OTHER_KEYS
    _coerce(value, rule.hint, dotted, file)
    section.kept[key] = value


def _fill_section(section: _Section, data: dict, prefix: str, file, root: _Section | None = None) -> None:
    """Set a section's fields from a parsed TOML table and keep its diffusion-pipe-only keys, rejecting unknown keys
    and bad values."""
    root = root if root is not None else section
    known = {f.name: f for f in _section_fields(section)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            if key not in section.KEPT:
                error = _unknown_key(section, key, prefix, file, root)
                if error:
                    raise ConfigError(error)
            _set_kept(section, key, value, dotted, file)
            continue
        current = getattr(section, key)
        if key == "directory" and isinstance(section, DatasetConfig):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"'directory'{_where(file)} must be [[directory]] tables with a path each.")
            dirs = []
            for i, table in enumerate(value):
                directory = DirectoryConfig()
                _fill_section(directory, table, f"directory.{i}.", file, root)
                _require(directory, f"directory.{i}.", file)
                dirs.append(directory)
            section.directory = dirs
        elif _is_section(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}'{_where(file)} must be a table ([{dotted}]), got {value!r}.")
            _fill_section(current, value, f"{dotted}.", file, root)
        else:
            setattr(section, key, _check_value(section, key, value, dotted, file))
        section.mark_explicit(key)


def _require(section: _Section, prefix: str, file) -> None:
    for f in _section_fields(section):
        value = getattr(section, f.name)
        if _is_section(value):
            if section.is_explicit(f.name) or any(g.metadata.get("required") for g in _section_fields(value)):
                _require(value, f"{prefix}{f.name}.", file)
        elif f.metadata.get("required") and not section.is_explicit(f.name):
            raise ConfigError(f"Missing key '{prefix}{f.name}'{_where(file)}: {f.metadata['help']}")


def _check_consistency(cfg: RunConfig | DatasetConfig, file) -> None:
    """Rules across keys, checked after every load and override."""
    if isinstance(cfg, DatasetConfig):
        for i, directory in enumerate(cfg.directory):
            settings = cfg.bucket_settings(directory)
            if settings["min_ar"] > settings["max_ar"]:
                raise ConfigError(f"'min_ar' ({settings['min_ar']}) is above 'max_ar' ({settings['max_ar']})"
                                  f"{_where(file)} for directory {i}.")
            if not directory.path:
                raise ConfigError(f"'directory.{i}.path'{_where(file)} is empty: name a folder of clips.")
        for buckets in [cfg.frame_buckets, *(d.frame_buckets for d in cfg.directory)]:
            for frames in buckets or []:
                if frames % 4 != 1:  # the VAE packs 4 frames per latent frame after the first
                    lower = frames - (frames - 1) % 4
                    raise ConfigError(f"frame bucket {frames}{_where(file)} is not 4k+1, which Wan needs: use "
                                      f"{lower} or {lower + 4}.")
    else:
        if cfg.adapter.init_from_existing == "":
            raise ConfigError(f"'adapter.init_from_existing'{_where(file)} is empty: name a LoRA folder or leave it "
                              "out.")
        for switch, key, refined, _ in _REFINEMENTS:
            value = functools.reduce(getattr, key.split("."), cfg)
            if getattr(cfg.studio, switch) and not any(value == r and type(value) is type(r) for r in refined):
                needed = " or ".join(_toml_literal(r) for r in refined)
                raise ConfigError(f"'studio.{switch}' = true{_where(file)} needs '{key}' = {needed}, "
                                  f"not {_toml_literal(value)}: set that, or set 'studio.{switch}' = false.")


def _check_save_cadence(cfg: RunConfig, file) -> None:
    """diffusion-pipe refuses a run TOML that sets no LoRA save cadence, so we neither read nor write one. Checked on
    load and save only: configs built in code get their cadence after construction."""
    if cfg.save_every_n_epochs is None and cfg.save_every_n_steps is None and cfg.save_every_n_examples is None:
        raise ConfigError(f"Set 'save_every_n_epochs' or 'save_every_n_steps'{_where(file)} (or "
                          "'save_every_n_examples'): diffusion-pipe refuses a run without one (e.g. "
                          "save_every_n_epochs = 1).")


# --------------------------------------------------------------------------------------------------- reading

def _upgrade_legacy(settings: dict[tuple[str, ...], Any], file) -> dict[tuple[str, ...], Any]:
    """Run settings {key path: value} with earlier studio versions' keys and values rewritten to the current form
    (same meaning); two settings that then disagree are an error."""
    out: dict[tuple[str, ...], Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    settings = dict(settings)
    if settings.pop(_COSINE_SWITCH, False) is True:
        scheduler = settings.get(("lr_scheduler",), "linear")
        if scheduler not in ("linear", "cosine"):
            raise ConfigError(f"'lr_scheduler' and 'studio.cosine_schedule'{_where(file)} disagree: "
                              f"'studio.cosine_schedule' = true (an earlier studio version's) means lr_scheduler = "
                              f"'cosine', not {_toml_literal(scheduler)}. Keep one of them.")
        settings[("lr_scheduler",)] = "cosine"
    for path, value in settings.items():
        key = ".".join(path)
        old = (key, value) if isinstance(value, str) else None
        for new_key, new_value in _LEGACY_VALUES.get(old, {_MOVED_KEYS.get(key, key): value}).items():
            new_path = tuple(new_key.split("."))
            if new_path in out and out[new_path] != new_value:
                raise ConfigError(f"'{origin[new_path]}' and '{key}'{_where(file)} disagree: read in the current form "
                                  f"they set '{new_key}' to {_toml_literal(out[new_path])} and "
                                  f"{_toml_literal(new_value)}. Keep one of them.")
            out[new_path], origin[new_path] = new_value, key
    return out


def _flatten(table: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{key path: value} of a parsed TOML table; empty tables stay values, so they are read as set."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, (*path, key)))
        else:
            flat[(*path, key)] = value
    return flat


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    table: dict = {}
    for path, value in flat.items():
        parent = table
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
            if not isinstance(parent, dict):  # e.g. `model = 3`: _fill_section names that key
                break
        else:
            parent[path[-1]] = value
    return table


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except TextFileError as err:
        raise ConfigError(str(err)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a diffusion-pipe run TOML (+ `[studio]`); ConfigError names any unknown, missing or bad key."""
    path = Path(path).expanduser().resolve()
    cfg = RunConfig(source=path)
    _fill_section(cfg, _nest(_upgrade_legacy(_flatten(_read_toml(path)), path)), "", path)
    _require(cfg, "", path)
    _check_consistency(cfg, path)
    _check_save_cadence(cfg, path)
    return cfg


def load_dataset_config(path: str | os.PathLike) -> DatasetConfig:
    """Read a diffusion-pipe dataset TOML; ConfigError names any unknown, missing or bad key."""
    path = Path(path).expanduser().resolve()
    cfg = DatasetConfig(source=path)
    _fill_section(cfg, _read_toml(path), "", path)
    _require(cfg, "", path)
    if not cfg.directory:
        raise ConfigError(f"{path} has no [[directory]] table: add one with the path of your clips folder.")
    _check_consistency(cfg, path)
    return cfg


# --------------------------------------------------------------------------------------------------- writing

def _section_dict(section: _Section, full: bool) -> dict:
    """The TOML table of a section: explicit, required and non-default keys (every set key when `full`)."""
    out: dict[str, Any] = {}
    for f in _section_fields(section):
        value = getattr(section, f.name)
        if isinstance(value, list) and value and all(_is_section(v) for v in value):
            out[f.name] = [_section_dict(v, full) for v in value]
        elif _is_section(value):
            table = _section_dict(value, full)
            if table or section.is_explicit(f.name):
                out[f.name] = table
        elif value is not None:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if full or section.is_explicit(f.name) or f.metadata.get("required") or value != default:
                out[f.name] = value
    out.update(section.kept)  # diffusion-pipe's keys the studio does not use, as they were read
    return out


def to_toml(cfg: RunConfig | DatasetConfig, full: bool = False) -> str:
    """TOML text of a config; `full` also writes keys left at their defaults (what the trainer will use)."""
    data = _section_dict(cfg, full)
    directories = data.pop("directory", None) if isinstance(cfg, DatasetConfig) else None
    text = tomli_w.dumps(data)
    for table in directories or []:  # [[directory]] tables, as diffusion-pipe's examples write them
        text += "\n[[directory]]\n" + tomli_w.dumps(table)
    return text


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write a run TOML atomically (after checking it); relative paths in it resolve against its new folder."""
    _check_consistency(cfg, path)
    _check_save_cadence(cfg, path)
    path = Path(path)
    atomic_write_text(path, to_toml(cfg))
    return path


def save_dataset_config(cfg: DatasetConfig, path: str | os.PathLike) -> Path:
    """Write a dataset TOML atomically, [[directory]] tables last."""
    _check_consistency(cfg, path)
    path = Path(path)
    atomic_write_text(path, to_toml(cfg))
    return path


# ------------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    from engine.training.interop import export_for_diffusion_pipe, notices

    parser = argparse.ArgumentParser(prog="python -m engine.training.config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load a run TOML and its dataset TOML; print what the studio does not use "
                                         "and both files with defaults filled in")
    check.add_argument("run_toml")
    export = sub.add_parser("export", help="write run.toml + dataset.toml for diffusion-pipe (absolute paths, "
                                           "runnable from any folder) and say what trains differently there")
    export.add_argument("run_toml")
    export.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.run_toml)
        dataset = load_dataset_config(run.dataset_path())
        if args.command == "export":
            exported = export_for_diffusion_pipe(run, dataset, args.out_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.command == "export":
        for note in exported.notices:
            print(f"note: {note}", file=sys.stderr)
        print(f"{exported.run_toml}\n{exported.dataset_toml}")
        return 0
    for note in notices(run, dataset):
        print(f"note: {note}", file=sys.stderr)
    print(f"# run config: {run.source}\n{to_toml(run, full=True)}")
    print(f"# dataset config: {dataset.source}\n{to_toml(dataset, full=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
