"""`python -m engine.training --config run.toml [--resume]` (also under deepspeed or torchrun for several GPUs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.training.loop import StopFlag
from engine.training.stages import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="run TOML (diffusion-pipe format + [studio])")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in <output_dir>/state")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    args = parser.parse_args(argv)
    stop = StopFlag()
    stop.install()
    _prefer_expandable_segments(args.config)
    return train(args.config, resume=args.resume, should_stop=stop)


def _prefer_expandable_segments(config_path: Path) -> None:
    """Block swap frees and refills GPU memory every step; without expandable segments the caching allocator
    fragments and a 24 GiB card runs out of memory (bench/NOTES.md). Must be set before CUDA allocates anything."""
    from engine.training.config import load_run_config
    from engine.training.schema import ConfigError

    try:
        swaps = load_run_config(config_path).blocks_to_swap
    except (ConfigError, OSError):
        return  # train() reports the problem as an event
    if swaps > 0:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


if __name__ == "__main__":
    sys.exit(main())
