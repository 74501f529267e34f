"""Trainer events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.files import append_jsonl

if TYPE_CHECKING:
    from engine.training.parallel import World


class TrainingError(RuntimeError):
    """A failure to report as an "error" event: `message` says what went wrong, `hint` what to do."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 2):
        super().__init__(message)
        self.hint, self.exit_code = hint, exit_code


# ====================================================================================================== events

class EventLog:
    """JSON-line events on stdout + metrics.jsonl, and TensorBoard scalars. Only rank 0 writes, except errors: a
    rank that fails says so itself (tagged with its rank), since rank 0 may not know why the others stopped."""

    def __init__(self, run_dir: Path | None, world: World):
        self.run_dir, self.world = run_dir, world  # no run_dir (config unreadable): stdout only
        self._tensorboard = None

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": time.time(), **fields}
        if event == "error" and self.world.distributed:
            record["rank"] = self.world.rank
        if self.world.is_main or event == "error":
            print(json.dumps(record, ensure_ascii=False), flush=True)
            if self.run_dir is None:
                return record
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            if event == "step":
                self._scalars(record)
        return record

    def phase(self, phase: str, message: str) -> None:
        self.emit("phase", phase=phase, message=message)

    def log(self, message: str) -> None:
        """A note for people reading the log (e.g. which optimizer a diffusion-pipe name became)."""
        self.emit("log", message=message)

    def _scalars(self, record: dict) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # scalars stay in metrics.jsonl; TensorBoard is a convenience
                self._tensorboard = False
                self.log("TensorBoard is not installed: metrics go to metrics.jsonl only.")
                return
            self._tensorboard = SummaryWriter(str(self.run_dir / "tb"))
        if self._tensorboard is False:
            return
        for name in ("loss", "lr", "steps_per_s"):
            self._tensorboard.add_scalar(f"train/{name}", record[name], record["step"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
