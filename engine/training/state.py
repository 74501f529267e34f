"""Training state for exact resume: LoRA weights, optimizer state, step, data position and RNG states.

A state is a folder `runs/<run>/state/step{S}/` holding safetensors files (every tensor) and `state.json` (every
scalar and each file's size and SHA-256), never a pickle. It is written into a hidden temporary folder, synced to disk
and renamed into place in one step, so a kill or a power cut at any moment leaves either the complete new state or
none of it; `latest_state_dir` only sees complete folders. A state damaged later on disk (a truncated copy, a bad
sector) fails `load_training_state` with StateDamagedError naming the file, and the resume falls back to the one before.
The state is rank-independent (global step and a global data position), so a run may resume on another GPU count.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.files import atomic_dir, atomic_write_json, file_sha256

STATE_FILE = "state.json"
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"step(\d+)")
TENSOR_FILES = (LORA_FILE, OPTIMIZER_FILE, RNG_FILE)


class StateDamagedError(ValueError):
    """A saved state cannot be read back as it was written; the message names the file."""


@dataclass
class TrainingState:
    """What a resumed run needs besides the model itself."""

    step: int  # optimizer steps done
    epoch: int  # epoch of the next micro-batch (1-based)
    global_micro_batches: int  # micro-batches consumed by all ranks together: the rank-independent data position
    lora: dict[str, torch.Tensor]  # trainable parameter name -> float32 tensor
    optimizer: dict  # optimizer.state_dict()
    rng: dict[str, Any]  # see capture_rng_state
    info: dict[str, Any]  # seed, world size, schedule... (for checks and for people reading state.json)


# ------------------------------------------------------------------------------------ nested state <-> tensors

def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of `obj` with each tensor moved into `tensors` under a dotted key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):  # keys kept with their types (optimizer state is keyed by int)
        return {"__dict__": [[key, _flatten(value, f"{prefix}.{key}", tensors)] for key, value in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot store a {type(obj).__name__} at {prefix} in a training state (tensors and scalars only).")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {key: _unflatten(value, tensors) for key, value in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


# ------------------------------------------------------------------------------------------------ RNG states

def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch and every CUDA device."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ save / load

def save_training_state(state_root: str | Path, state: TrainingState, keep: int = 2) -> Path:
    """Write `state_root/step{S}/` atomically (temporary folder, synced, then one rename); keep the newest `keep`."""
    from safetensors.torch import save_file

    state_root = Path(state_root)
    final = state_root / f"step{state.step}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.lora.items()}, str(tmp / LORA_FILE))
        optimizer_tensors: dict[str, torch.Tensor] = {}
        optimizer_skeleton = _flatten(state.optimizer, "optimizer", optimizer_tensors)
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE))
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_skeleton = _flatten(state.rng, "rng", rng_tensors)
        save_file(rng_tensors, str(tmp / RNG_FILE))
        atomic_write_json(tmp / STATE_FILE, {
            "format": STATE_FORMAT, "step": state.step, "epoch": state.epoch,
            "global_micro_batches": state.global_micro_batches, "info": state.info,
            "optimizer": optimizer_skeleton, "rng": rng_skeleton,
            "files": {name: _file_record(tmp / name) for name in TENSOR_FILES},
        })
    for old in list_state_dirs(state_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def list_state_dirs(state_root: str | Path) -> list[Path]:
    """State folders under `state_root`, oldest step first (each complete when written: see the module docstring)."""
    state_root = Path(state_root)
    if not state_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_state_dir(state_root: str | Path) -> Path | None:
    dirs = list_state_dirs(state_root)
    return dirs[-1] if dirs else None


def load_training_state(state_dir: str | Path) -> TrainingState:
    """Read a state folder written by save_training_state (safetensors + JSON only).

    Raises StateDamagedError naming the file when a file is missing, truncated, altered or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    try:
        meta = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateDamagedError(f"{state_dir / STATE_FILE} cannot be read: {err}") from err
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_dir / STATE_FILE} has state format {meta.get('format')}, expected {STATE_FORMAT}.")
    for name, expected in meta.get("files", {}).items():  # states written before checksums have none
        path = state_dir / name
        try:
            found = _file_record(path)
        except OSError as err:
            raise StateDamagedError(f"{path} cannot be read: {err}") from err
        if found != expected:
            raise StateDamagedError(f"{path} is damaged: {found['bytes']} bytes with SHA-256 {found['sha256'][:12]}, "
                                    f"written as {expected['bytes']} bytes with SHA-256 {expected['sha256'][:12]}.")
    tensors = {}
    for name in TENSOR_FILES:
        try:
            tensors[name] = load_file(str(state_dir / name))
        except (SafetensorError, OSError) as err:
            raise StateDamagedError(f"{state_dir / name} cannot be read: {err}") from err
    try:
        return TrainingState(
            step=int(meta["step"]), epoch=int(meta["epoch"]), global_micro_batches=int(meta["global_micro_batches"]),
            lora=tensors[LORA_FILE], optimizer=_unflatten(meta["optimizer"], tensors[OPTIMIZER_FILE]),
            rng=_unflatten(meta["rng"], tensors[RNG_FILE]), info=meta.get("info", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise StateDamagedError(f"{state_dir / STATE_FILE} does not match its tensor files: {err!r}") from err
