"""The settings form of the Train tab, generated from the config dataclasses: field descriptions and typed overrides."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any

from engine.training.config import (
    _check_consistency,
    _check_value,
    _is_section,
    _section_fields,
    _set_kept,
    _type_name,
    _upgrade_legacy,
    _where,
)
from engine.training.schema import ConfigError, DatasetConfig, RunConfig, _Section

# ------------------------------------------------------------------------------------- form support (Train tab)

@dataclass(frozen=True)
class FieldInfo:
    """One editable setting, for a generated form."""

    key: str  # dotted key, e.g. "optimizer.lr" or "directory.0.num_repeats"
    help: str
    type: str  # "integer", "number", "true/false", "text", "list of number", ...
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    optional: bool  # may be left unset
    value: Any
    default: Any


def describe_fields(cfg: RunConfig | DatasetConfig) -> list[FieldInfo]:
    """Every setting of a config in TOML order, with its help, type, choices, range and current value."""
    out: list[FieldInfo] = []

    def walk(section: _Section, prefix: str) -> None:
        hints = typing.get_type_hints(type(section))
        for f in _section_fields(section):
            value = getattr(section, f.name)
            if _is_section(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            if f.name == "directory" and isinstance(section, DatasetConfig):
                for i, item in enumerate(value):
                    walk(item, f"{prefix}{f.name}.{i}.")
                continue
            hint = hints[f.name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
            out.append(FieldInfo(f"{prefix}{f.name}", f.metadata["help"], _type_name(hint), f.metadata["choices"],
                                 f.metadata["minimum"], f.metadata["maximum"], optional, value, default))

    walk(cfg, "")
    return out


def _parse_text(text: str) -> Any:
    """A form's text for a non-text field, read as a TOML value (e.g. "[0.9, 0.99]", "true", "2e-5")."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RunConfig | DatasetConfig, overrides: dict[str, Any]) -> RunConfig | DatasetConfig:
    """Return a copy of `cfg` with {dotted.key: value} applied, each validated as if read from the file.

    Text values for non-text fields are parsed as TOML values; None or "" unsets an optional field. A diffusion-pipe
    key the studio keeps but does not use (schema `KEPT`) is set as given; None removes it.
    """
    new = copy.deepcopy(cfg)
    file = cfg.source
    paths = {tuple(key.split(".")): value for key, value in overrides.items()}
    if isinstance(cfg, RunConfig):
        paths = _upgrade_legacy(paths, file)
    for (*parents, name), value in paths.items():
        key = ".".join((*parents, name))
        section: Any = new
        for part in parents:
            if isinstance(section, list) and part.isdigit() and int(part) < len(section):
                section = section[int(part)]
            elif _is_section(section) and part in {f.name for f in _section_fields(section)}:
                section = getattr(section, part)
            else:
                raise ConfigError(f"Unknown setting '{key}'{_where(file)}.")
        if _is_section(section) and name in section.KEPT:
            _set_kept(section, name, value, key, file)
            continue
        if not _is_section(section) or name not in {f.name for f in _section_fields(section)} or _is_section(
                getattr(section, name)):
            raise ConfigError(f"Unknown setting '{key}'{_where(file)}.")
        hint = typing.get_type_hints(type(section))[name]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        if isinstance(value, str) and optional and not value.strip():
            value = None
        elif isinstance(value, str) and hint is not str and not (optional and str in typing.get_args(hint)):
            value = _parse_text(value)
        setattr(section, name, _check_value(section, name, value, key, file))
        section.mark_explicit(name)
    _check_consistency(new, file)
    return new
