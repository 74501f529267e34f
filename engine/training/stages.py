"""A training run in stages: validate (config, model folder, dataset) -> cache -> train."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from engine.core.files import remove_stale_temps
from engine.core.layout import RunLayout
from engine.training.events import ErrorEvent, EventLog, ProgressEvent, TrainingError
from engine.training.loop import EXIT_OK, Trainer, memory_hint
from engine.training.model import compute_dtype, storage_dtype
from engine.training.parallel import World, any_rank, barrier, start_world
from engine.training.state import (
    StateDamagedError,
    TrainingState,
    latest_state_dir,
    list_state_dirs,
    load_training_state,
)

# ================================================================================================ the stages

def load_configs(config_path: str | Path):
    from engine.training.config import load_dataset_config, load_run_config
    from engine.training.schema import ConfigError

    try:
        run_cfg = load_run_config(config_path)
        dataset_cfg = load_dataset_config(run_cfg.dataset_path())
    except ConfigError as err:
        raise TrainingError(str(err), "Fix the named key (python -m engine.training.config check RUN.toml shows the "
                                      "resolved settings).") from err
    return run_cfg, dataset_cfg


def validate(run_cfg, dataset_cfg, events: EventLog):
    """Model folder and dataset report: errors stop the run, warnings are logged."""
    from engine.core.models import ModelFolderError, check_wan_folder
    from engine.training.dataset import scan_dataset
    from engine.training.interop import notices, trains_here
    from engine.training.schema import OPTIMIZER_TYPES

    events.phase("validate", f"Checking the model folder and the dataset {dataset_cfg.source}.")
    for note in notices(run_cfg, dataset_cfg):
        events.log(note)
    if not trains_here(run_cfg.optimizer.type):
        raise TrainingError(f"optimizer.type = '{run_cfg.optimizer.type}' is diffusion-pipe's; the studio cannot "
                            "train with it.", f"Set [optimizer] type to one of {', '.join(OPTIMIZER_TYPES)}.")
    if not run_cfg.optimizer.is_explicit("lr"):  # diffusion-pipe would take the optimizer class's own default
        raise TrainingError(f"[optimizer] lr is not set in {run_cfg.source}.", "Set [optimizer] lr (e.g. 2e-5).")
    try:
        check_wan_folder(run_cfg.model.ckpt_path)
    except ModelFolderError as err:
        raise TrainingError(str(err), "Set [model] ckpt_path to a diffusers Wan 2.1 I2V or Wan 2.2 I2V A14B "
                                      "folder.") from err
    report = scan_dataset(dataset_cfg, video_clip_mode=run_cfg.clip_mode)
    for warning in report.warnings:
        events.log(f"Dataset warning: {warning.file}: {warning.message}")
    if report.errors:
        listed = "; ".join(f"{e.file}: {e.message}" for e in report.errors[:10])
        more = f" (and {len(report.errors) - 10} more)" if len(report.errors) > 10 else ""
        raise TrainingError(f"The dataset has {len(report.errors)} error(s): {listed}{more}",
                            "Fix these clips or captions (the Clips and Captions tabs), then start again.")
    if not report.clips:
        folders = ", ".join(str(d.path) for d in dataset_cfg.directory)
        raise TrainingError(f"The dataset is empty: no clips found in {folders}.",
                            "Add clips with captions (clip.mp4 + clip.txt) to the folder, or fix its path.")
    return report


def cache(run_cfg, dataset_cfg, report, layout: RunLayout, world: World, device: torch.device, events: EventLog,
          should_stop: Callable[[], bool]):
    """Encode what is not cached yet (each rank its share); None when stopped on request."""
    from engine.training.cache import CachingStopped, cache_dataset

    events.phase("cache", f"Caching latents and embeddings in {layout.cache_dir}.")

    def progress(fraction: float, message: str) -> None:
        events.emit(ProgressEvent(phase="cache", fraction=float(fraction), message=message))

    try:
        dataset = cache_dataset(dataset_cfg, run_cfg.model.ckpt_path, layout.cache_dir, device=device,
                                dtype=compute_dtype(run_cfg, device), rank=world.rank, world_size=world.world_size,
                                video_clip_mode=run_cfg.clip_mode, report=report, on_progress=progress,
                                should_stop=should_stop)
    except CachingStopped:
        dataset = None
    if any_rank(dataset is None, world, device):
        return None
    barrier(world)  # every rank has written its share
    missing = dataset.missing_files()
    if missing:
        raise TrainingError(f"{len(missing)} cache files are missing after caching, e.g. {missing[0]}.",
                            "Check the free disk space and start again: finished files are reused.")
    gc.collect()  # the encoders are gone: give their memory back before the transformer loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dataset


def train(config_path: str | Path, *, resume: bool = False, should_stop: Callable[[], bool] | None = None) -> int:
    """Run the whole pipeline for a run TOML; returns the process exit code (0 also when stopped on request).

    The run folder and the studio's GPU are held for the whole run: a second trainer on the same run, or any GPU job
    of the studio, is refused with the holder's pid (before it writes anything into the run folder).
    """
    world, device = start_world()
    should_stop = should_stop or (lambda: False)
    events = EventLog(None, world)
    locks = ExitStack()
    try:
        run_cfg, dataset_cfg = load_configs(config_path)
        layout = RunLayout(run_cfg.output_path())
        locks = hold_run(layout.root, world, device)
        events = EventLog(layout, world)
        if world.is_main:
            for left in remove_stale_temps(layout.root, recursive=True):
                events.log(f"Removed {left}, left by a save that was killed.")
        should_stop = _or_stop_requested(should_stop, layout.stop_request_file)
        torch.manual_seed(run_cfg.studio.seed)
        state = _resume_state(layout, resume, events, world)
        report = validate(run_cfg, dataset_cfg, events)
        dataset = cache(run_cfg, dataset_cfg, report, layout, world, device, events, should_stop)
        if dataset is None:
            events.phase("stopped", "Stopped while caching; cached clips are kept and reused next time.")
            return EXIT_OK
        trainer = Trainer(run_cfg, dataset, world=world, device=device, events=events, should_stop=should_stop,
                          layout=layout)
        if state is not None and state.global_micro_batches % world.world_size:
            events.log(f"The saved data position ({state.global_micro_batches} micro-batches) does not split evenly "
                       f"over {world.world_size} ranks: up to {world.world_size - 1} micro-batches are repeated.")
        from engine.core.models import load_wan_transformer

        transformers = [load_wan_transformer(run_cfg.model.ckpt_path, storage_dtype(run_cfg, device),
                                             expert=plan.expert.name) for plan in trainer.plans]
        try:
            trainer.build(transformers, state)
        except torch.OutOfMemoryError as err:
            raise TrainingError(f"CUDA out of memory while placing the model on {device}: {str(err).splitlines()[0]}",
                                memory_hint(run_cfg, dataset.items[0].bucket)) from err
        return trainer.run()
    except TrainingError as err:
        events.emit(ErrorEvent(message=str(err), hint=err.hint))
        events.phase("error", str(err))
        return err.exit_code
    except Exception as err:  # anything unforeseen still ends with an event the Train tab can show
        events.emit(ErrorEvent(message=f"{type(err).__name__}: {err}", hint="See the log for the traceback."))
        events.phase("error", str(err))
        raise
    finally:
        events.close()
        locks.close()
        if world.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def hold_run(run_dir: Path, world: World, device: torch.device) -> ExitStack:
    """Take the run folder's lock (rank 0) and the studio's GPU lock (local rank 0 of each machine); all ranks refuse
    together with a TrainingError naming the holder when either is taken."""
    from engine.core.layout import jobs_dir, studio_home
    from engine.jobs import FolderBusyError, GpuBusyError, JobRunner, exclusive_folder

    locks, refusal = ExitStack(), None
    description = f"training run {run_dir.name!r}"
    try:
        if world.is_main:
            locks.enter_context(exclusive_folder(run_dir, description))
        if world.local_rank == 0:
            locks.enter_context(JobRunner(jobs_dir(studio_home())).hold_gpu(description))
    except (FolderBusyError, GpuBusyError) as err:
        refusal = err
    if any_rank(refusal is not None, world, device):
        locks.close()
        raise TrainingError(str(refusal) if refusal else "Another rank of this run found its lock taken.",
                            "One trainer per run and one GPU job at a time: wait for the other to finish, or stop "
                            "it (the Train tab, or Ctrl-C in its terminal).")
    return locks


def _or_stop_requested(should_stop: Callable[[], bool], request_file: Path) -> Callable[[], bool]:
    """should_stop, or a stop request written into the run folder after this run started (an older request, left
    from a stop before a resume, is ignored)."""
    started = time.time()

    def stop_requested() -> bool:
        if should_stop():
            return True
        try:
            return request_file.stat().st_mtime >= started
        except FileNotFoundError:
            return False

    return stop_requested


def _resume_state(layout: RunLayout, resume: bool, events: EventLog, world: World) -> TrainingState | None:
    """The latest readable saved state when resuming. A damaged newest state is moved aside (never deleted) and the
    one before it is used, with a log line naming both. A fresh start moves earlier states aside, so a later --resume
    can never pick up a state of the earlier run (nothing is deleted)."""
    if not resume:
        if world.is_main and latest_state_dir(layout.state_root) is not None:
            aside = layout.state_aside(time.strftime("%Y%m%d-%H%M%S"))
            layout.state_root.rename(aside)
            events.log(f"Started without --resume: the earlier run's resume states were moved to {aside}.")
        barrier(world)
        return None
    damaged: list[tuple[Path, StateDamagedError]] = []
    state, chosen = None, None
    for state_dir in reversed(list_state_dirs(layout.state_root)):
        try:
            state, chosen = load_training_state(state_dir), state_dir
            break
        except StateDamagedError as err:
            damaged.append((state_dir, err))
    barrier(world)  # every rank has read (or failed to read) the same folders before any is moved
    for state_dir, err in damaged:
        aside = state_dir.with_name(f"{state_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        if world.is_main:
            state_dir.rename(aside)
        fallback = f"resuming from {chosen} instead" if chosen else "no earlier state is kept"
        events.log(f"The saved state {state_dir} is damaged ({err}); moved it to {aside.name}, {fallback}.")
    if state is None:
        if damaged:
            raise TrainingError(f"No readable saved state in {layout.state_root}: {damaged[-1][1]}",
                                "Start the run again without --resume (the damaged states are kept aside).")
        events.log(f"No saved state in {layout.state_root}: starting from step 0.")
        return None
    events.log(f"Resuming from {chosen} (step {state.step}).")
    return state
