"""`python -m engine.training --config run.toml [--resume | --check]` (also under deepspeed or torchrun for several
GPUs). `--check` runs only the dataset check (what the Train tab's "Check dataset" shows) and exits 2 on errors."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.core.quiet import quiet_known_noise

quiet_known_noise()  # before the trainer's imports bring in DeepSpeed, bitsandbytes and transformers

from engine.training.loop import StopFlag
from engine.training.stages import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="run TOML (diffusion-pipe format + [studio])")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in <output_dir>/state")
    parser.add_argument("--check", action="store_true",
                        help="only check the dataset and estimate the run (exit 2 when it finds errors)")
    parser.add_argument("--num-gpus", type=int, default=1, metavar="N",
                        help="with --check: count the steps for N data-parallel GPUs (default 1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by deepspeed
    args = parser.parse_args(argv)
    if args.check:
        return check(args.config, args.num_gpus)
    stop = StopFlag()
    stop.install()
    _prefer_expandable_segments(args.config)
    return train(args.config, resume=args.resume, should_stop=stop)


def check(config_path: Path, num_gpus: int = 1) -> int:
    """Print the pre-flight report of a run file (steps counted for `num_gpus` GPUs); 2 when the configs or the
    dataset have errors, else 0."""
    from engine.training.check import preflight
    from engine.training.events import TrainingError
    from engine.training.stages import load_configs

    try:
        run_cfg, dataset_cfg = load_configs(config_path)
    except TrainingError as err:
        print(f"error: {err}\n{err.hint}", file=sys.stderr)
        return err.exit_code
    report = preflight(run_cfg, dataset_cfg, num_gpus=num_gpus)
    for error in report.errors:
        print(f"error: {error}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(report.estimate().replace("**", ""))
    if report.errors:
        print(f"{len(report.errors)} error(s): fix them (the Clips and Captions tabs) before training.",
              file=sys.stderr)
        return 2
    print("Ready to train.")
    return 0


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
