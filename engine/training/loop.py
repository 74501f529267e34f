"""The training loop: epochs of micro-batches, gradient accumulation, saves, samples and resume states."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from engine.core.families import family_of
from engine.core.files import atomic_path
from engine.core.layout import RunLayout
from engine.core.video import VideoError, probe_video, read_frames
from engine.speed.parking import ModelParking
from engine.training.events import EventLog, SampleEvent, SaveEvent, StepEvent, TrainingError
from engine.training.experts import ExpertSlot, activate, choose_expert, plan_experts
from engine.training.model import TrainableTransformer, compute_dtype, prepare_transformer, torch_dtype
from engine.training.objective import TimestepSampling, flow_matching_loss, micro_batch_generator, stack_items
from engine.training.optim import build_optimizer, learning_rate, optimizer_record, resume_optimizer
from engine.training.parallel import (
    DataStream,
    DeepSpeedStepper,
    LocalStepper,
    World,
    all_ranks_mean,
    any_rank,
    barrier,
    planned_steps,
)
from engine.training.state import TrainingState, capture_rng_state, restore_rng_state, save_training_state

STATES_KEPT = 2  # resume states kept on disk: the newest two, should the newest be damaged on disk


EXIT_OK, EXIT_DISK_FULL = 0, 3  # configuration and data errors exit 2 (TrainingError.exit_code)


class StopFlag:
    """Set by SIGINT/SIGTERM: the trainer finishes the current step, saves its state and exits 0."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


# =============================================================================================== the training run

class Trainer:
    """One training run from a loaded config and a cached dataset; `run()` returns the process exit code.

    It trains one LoRA per expert of `plans` (engine.training.experts): Wan 2.1's transformer, or Wan 2.2's
    high-noise and/or low-noise expert, each step on the expert that owns the step's noise levels.
    """

    def __init__(self, run_cfg, dataset, *, world: World, device: torch.device, events: EventLog,
                 should_stop: Callable[[], bool], layout: RunLayout):
        self.cfg, self.dataset, self.world, self.device = run_cfg, dataset, world, device
        self.events, self.should_stop, self.layout = events, should_stop, layout
        self.seed = run_cfg.studio.seed
        self.accumulation = run_cfg.gradient_accumulation_steps
        self.stream = DataStream(dataset, seed=self.seed, batch_size=run_cfg.micro_batch_size_per_gpu, world=world)
        self.max_steps = planned_steps(self.stream.per_epoch, epochs=run_cfg.epochs, accumulation=self.accumulation,
                                       max_steps=run_cfg.max_steps)
        # diffusion-pipe's schedule length (train.py): epochs x steps per epoch, whatever max_steps says
        self.schedule_steps = max(1, run_cfg.epochs * (self.stream.per_epoch // self.accumulation))
        self.timesteps = TimestepSampling.from_run_config(run_cfg)
        self.family = family_of(run_cfg.model.ckpt_path)
        self.boundary = self.family.boundary(run_cfg.model.ckpt_path)
        self.plans = plan_experts(run_cfg, self.family, self.boundary)
        if not self.plans:
            raise TrainingError(f"[model] min_t..max_t = {run_cfg.model.min_t}..{run_cfg.model.max_t} meets no "
                                f"expert of {self.family.title}.", "Widen min_t / max_t (0 and 1 train all).")
        self.fingerprint = dataset.fingerprint
        self.step = 0
        self.position = (0, 0)  # (step, this rank's micro-batch index at that step)
        self.slots: list[ExpertSlot] = []
        self.active: ExpertSlot | None = None  # the expert of the current step

    @property
    def trainable(self) -> TrainableTransformer:
        """The first trained expert's LoRA transformer (Wan 2.1's only one)."""
        return self.slots[0].trainable

    # ---- setup
    def build(self, transformers: torch.nn.Module | list[torch.nn.Module], state: TrainingState | None) -> None:
        """Wrap each planned expert's transformer (in `plans` order) with its LoRA, optimizer and stepper."""
        transformers = transformers if isinstance(transformers, list) else [transformers]
        several = len(self.family.experts) > 1
        for plan, transformer in zip(self.plans, transformers, strict=True):
            trainable = prepare_transformer(transformer, self.cfg, self.device)
            slot = ExpertSlot(plan, trainable, prefix=f"{plan.expert.name}." if several else "")
            if len(self.plans) > 1:
                slot.parking = ModelParking(trainable.module, self.device, trainable.block_swapper)
                slot.parking.park()  # the next expert needs the GPU memory; activate() brings it back
            self.slots.append(slot)
            for note in trainable.notes:
                self.events.log(f"{plan.expert.label}: {note}" if several else note)
        if several:
            trained = " and ".join(f"{p.expert.label} on t in [{p.t_range[0]:g}, {p.t_range[1]:g}) at lr {p.lr:g}"
                                   for p in self.plans)
            self.events.log(f"{self.family.title}: training the {trained}; boundary {self.boundary:g}."
                            + (" The inactive expert waits in CPU memory." if len(self.plans) > 1 else ""))
        if state is not None and set(self._trained_parameters()) != set(state.lora):
            raise TrainingError("The saved training state does not match this run's LoRA (rank, target modules or "
                                "trained experts changed).",
                                "Resume with the settings the run started with, or start a new run.")
        optimizers = (state.optimizer if several else {"": state.optimizer}) if state is not None else {}
        init_from = self.cfg.adapter.init_from_existing
        for index, slot in enumerate(self.slots):
            activate(self.slots, index)  # each expert's LoRA is set up on the GPU it trains on
            if state is not None:
                self._load_lora(slot, state.lora)
            elif init_from:
                path = self.cfg.base_dir / Path(init_from).expanduser()
                self._init_expert_from(slot, path / self.family.lora_file_name(slot.plan.expert) if several
                                       else path)
            optimizer_cfg = dataclasses.replace(self.cfg.optimizer, lr=slot.plan.lr)
            slot.optimizer, note = build_optimizer(slot.trainable.parameters, optimizer_cfg, self.device)
            if slot is self.slots[0]:
                self.events.log(note)
            if self.world.distributed:
                slot.stepper = DeepSpeedStepper(slot.optimizer, slot.trainable.parameters, self.accumulation,
                                                self.cfg.gradient_clipping, self.cfg.micro_batch_size_per_gpu)
            else:
                slot.stepper = LocalStepper(slot.optimizer, slot.trainable.parameters, self.accumulation,
                                            self.cfg.gradient_clipping)
            if state is not None:
                records = state.info.get("optimizer") or {}
                record = records.get(slot.name) if several else records
                try:
                    notes = resume_optimizer(slot.optimizer, optimizer_cfg, optimizers[slot.name if several else ""],
                                             record or None)
                except ValueError as err:
                    raise TrainingError(str(err), "Set [optimizer] type back to resume, or start a new run.") from err
                for note in notes:
                    self.events.log(note)
            if slot.parking is not None:
                slot.parking.optimizer = slot.optimizer
        if state is not None:
            restore_rng_state(state.rng)
            self.step = state.step
            # The data position is global: on another GPU count each rank starts at its share of it.
            self.position = (state.step, state.global_micro_batches // self.world.world_size)
        if self.world.distributed:
            self.events.log(f"Data parallel over {self.world.world_size} ranks through DeepSpeed (ZeRO stage 0): "
                            "gradients averaged every step, rank 0 writes the files.")

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every expert's LoRA parameters under their resume-state names."""
        return {slot.prefix + name: p for slot in self.slots
                for name, p in slot.trainable.module.named_parameters() if p.requires_grad}

    def _load_lora(self, slot: ExpertSlot, lora: dict[str, torch.Tensor]) -> None:
        """One expert's LoRA weights from a resume state (keys carry the slot's prefix)."""
        with torch.no_grad():
            for name, p in slot.trainable.module.named_parameters():
                if p.requires_grad:
                    p.copy_(lora[slot.prefix + name].to(p.device))

    def _init_expert_from(self, slot: ExpertSlot, path: Path) -> None:
        from peft import set_peft_model_state_dict

        from engine.generate.lora_files import LoraFileError, LoraMismatchError, check_keys_match_model, load_lora

        try:
            weights = load_lora(path)
            check_keys_match_model(weights, slot.trainable.module)
        except (LoraFileError, LoraMismatchError) as err:
            raise TrainingError(str(err), "Fix [adapter] init_from_existing or leave it out.") from err
        if weights.rank != self.cfg.adapter.rank:
            raise TrainingError(f"{path} has rank {weights.rank}, this run rank {self.cfg.adapter.rank}.",
                                f"Set [adapter] rank = {weights.rank} to continue from it.")
        our_scale = self.cfg.lora_alpha / self.cfg.adapter.rank
        state = {k: (v / our_scale if ".lora_B." in k else v).float()
                 for k, v in weights.to_diffusers_peft(prefix="").items()}  # alpha/rank of the file baked in
        result = set_peft_model_state_dict(slot.trainable.module, state)
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"{path}: keys not in this LoRA: {result.unexpected_keys[:3]}",
                                f"Use a {self.family.title} LoRA.")
        self.events.log(f"LoRA initialised from {path} ({len(weights.modules)} modules).")

    # ---- the loop
    def run(self) -> int:
        if self.step >= self.max_steps:
            self.events.phase("done", f"Nothing left to do: step {self.step} of {self.max_steps}.")
            return EXIT_OK
        self.events.phase("train", f"Training {self.max_steps} steps from step {self.step} on "
                                   f"{self.world.world_size} x {self.device.type}.")
        started, start_step = time.monotonic(), self.step
        last_state_time = time.monotonic()
        while self.step < self.max_steps:
            epoch_before = self._epoch_of_next_batch()
            loss = self._train_step()
            self.step += 1
            elapsed = time.monotonic() - started
            steps_per_s = (self.step - start_step) / elapsed if elapsed > 0 else 0.0
            if self.step % self.cfg.steps_per_print == 0 or self.step >= self.max_steps:
                self.events.emit(StepEvent(
                    step=self.step, max_steps=self.max_steps, epoch=epoch_before, loss=loss,
                    lr=self.active.optimizer.param_groups[0]["lr"], steps_per_s=steps_per_s,
                    eta_s=(self.max_steps - self.step) / steps_per_s if steps_per_s else 0.0,
                    gpu_mem_gib=(torch.cuda.max_memory_allocated(self.device) / 2**30
                                 if self.device.type == "cuda" else None),
                    expert=self.active.name if len(self.family.experts) > 1 else None))
            finished_epoch = epoch_before if self._epoch_of_next_batch() > epoch_before else None
            last = self.step >= self.max_steps
            self._save_outputs(finished_epoch, last)
            stop = any_rank(self.should_stop(), self.world, self.device)
            minutes = self.cfg.checkpoint_every_n_minutes
            due_by_time = any_rank(bool(minutes) and time.monotonic() - last_state_time >= minutes * 60,
                                   self.world, self.device)  # ranks' clocks differ: decide together
            if stop or last or due_by_time or self._state_due(finished_epoch):
                self._save_state()
                last_state_time = time.monotonic()
            if stop and not last:
                self.events.phase("stopped", f"Stopped at step {self.step} of {self.max_steps}; the state is saved: "
                                             "resume to continue.")
                return EXIT_OK
        self.events.phase("done", f"Finished {self.max_steps} steps.")
        return EXIT_OK

    def _epoch_of_next_batch(self) -> int:
        return self.stream.batch(self._local_index(0))[0]

    def _local_index(self, micro: int) -> int:
        """This rank's index (across epochs) of micro-batch `micro` of the current step."""
        start_step, start_index = self.position
        return start_index + (self.step - start_step) * self.accumulation + micro

    def _train_step(self) -> float:
        self.active = activate(self.slots, choose_expert(self.plans, self.timesteps, self.seed, self.step))
        lr = learning_rate(self.step, lr=self.active.plan.lr, warmup_steps=self.cfg.warmup_steps,
                           schedule_steps=self.schedule_steps, schedule=self.cfg.lr_scheduler)
        for group in self.active.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(self.accumulation):
            local_index = self._local_index(micro)
            _, indices = self.stream.batch(local_index)
            batch = stack_items([self.dataset.load(self.dataset.items[i]) for i in indices], self.device)
            generator = micro_batch_generator(self.seed, self.stream.global_index(local_index))
            try:
                loss = flow_matching_loss(self.active.trainable.module, batch, timesteps_cfg=self.timesteps,
                                          generator=generator, autocast_dtype=compute_dtype(self.cfg, self.device),
                                          t_range=self.active.plan.t_range)
                self.active.stepper.backward(loss)
            except torch.OutOfMemoryError as err:
                raise TrainingError(f"CUDA out of memory at step {self.step + 1}: {str(err).splitlines()[0]}",
                                    memory_hint(self.cfg, self.dataset.items[indices[0]].bucket)) from err
            self.active.stepper.micro_step(boundary=micro == self.accumulation - 1)
            losses.append(float(loss.detach()))
        return all_ranks_mean(sum(losses) / len(losses), self.world, self.device)

    # ---- outputs
    def _state_due(self, finished_epoch: int | None) -> bool:
        every = self.cfg.studio.state_every_n_steps
        if every and self.step % every == 0:
            return True
        every = self.cfg.checkpoint_every_n_epochs
        return bool(every and finished_epoch and finished_epoch % every == 0)

    def _save_outputs(self, finished_epoch: int | None, last: bool) -> None:
        every_epochs, every_steps = self.cfg.save_every_n_epochs, self.cfg.save_every_n_steps
        if self.cfg.save_every_n_examples:  # diffusion-pipe's train.py: N examples // global batch replaces steps
            every_steps = self.cfg.save_every_n_examples // (
                self.cfg.micro_batch_size_per_gpu * self.accumulation * self.world.world_size)
        if finished_epoch and (last or (every_epochs and finished_epoch % every_epochs == 0)):
            self._save_lora(self.layout.epoch_dir(finished_epoch), finished_epoch)
        elif last:  # a run cut short by max_steps still leaves its LoRA
            self._save_lora(self.layout.epoch_dir(self._epoch_of_next_batch()), self._epoch_of_next_batch())
        if every_steps and self.step % every_steps == 0:
            self._save_lora(self.layout.step_dir(self.step), self._epoch_of_next_batch())
        if finished_epoch and finished_epoch in self.cfg.studio.samples.epochs:
            self._render_sample(finished_epoch)

    def _save_lora(self, folder: Path, epoch: int) -> None:
        """One LoRA file per trained expert in `folder`, named as families.lora_file_name says."""
        if self.world.is_main:
            with self._lora_resident():
                self._write_loras(folder, epoch, torch_dtype(self.cfg.lora_save_dtype))
        barrier(self.world)

    @contextlib.contextmanager
    def _lora_resident(self) -> Iterator[None]:
        """Every expert's LoRA and optimizer state on its device while they are saved (parked experts too)."""
        with contextlib.ExitStack() as stack:
            for slot in self.slots:
                if slot.parking is not None:
                    stack.enter_context(slot.parking.live_resident())
            yield

    def _write_loras(self, folder: Path, epoch: int, dtype: torch.dtype) -> None:
        from engine.generate.lora_files import save_lora

        for slot in self.slots:
            state = {k: v.detach().to("cpu", dtype) for k, v in slot.trainable.lora_state_dict().items()}
            expert = {"expert": slot.name, "t_range": list(slot.plan.t_range)} if slot.prefix else {}
            path = _writing(lambda: save_lora(
                state, folder, rank=self.cfg.adapter.rank, alpha=self.cfg.lora_alpha,
                file_name=self.family.lora_file_name(slot.plan.expert),
                metadata={"base_model": self.cfg.model.ckpt_path, "model_family": self.family.key,
                          "rank": self.cfg.adapter.rank, "alpha": self.cfg.lora_alpha, "steps": self.step,
                          "epoch": epoch, "dataset_fingerprint": self.fingerprint, "seed": self.seed,
                          "trainer": "wan-lora-studio engine.training", **expert}), folder)
            self.events.emit(SaveEvent(kind="lora", epoch=epoch, step=self.step, path=str(path),
                                       expert=slot.name if slot.prefix else None))

    def _save_state(self) -> None:
        if self.world.is_main:
            with self._lora_resident():
                self._write_state()
        barrier(self.world)

    def _write_state(self) -> None:
        several = len(self.family.experts) > 1
        optimizer = ({slot.name: slot.optimizer.state_dict() for slot in self.slots} if several
                     else self.slots[0].optimizer.state_dict())
        state = TrainingState(
            step=self.step, epoch=self._epoch_of_next_batch(),
            global_micro_batches=self._local_index(0) * self.world.world_size,
            lora={name: p.detach().float() for name, p in self._trained_parameters().items()},
            optimizer=optimizer, rng=capture_rng_state(),
            info={"seed": self.seed, "world_size": self.world.world_size, "accumulation": self.accumulation,
                  "micro_batch_size": self.cfg.micro_batch_size_per_gpu, "max_steps": self.max_steps,
                  "lr_scheduler": self.cfg.lr_scheduler, "warmup_steps": self.cfg.warmup_steps,
                  "dataset_fingerprint": self.fingerprint, "model_family": self.family.key,
                  "experts": [slot.name for slot in self.slots],
                  "optimizer": {slot.name: optimizer_record(slot.optimizer, dataclasses.replace(
                      self.cfg.optimizer, lr=slot.plan.lr)) for slot in self.slots} if several
                  else optimizer_record(self.slots[0].optimizer, self.cfg.optimizer)})
        path = _writing(lambda: save_training_state(self.layout.state_root, state, keep=STATES_KEPT),
                        self.layout.state_root)
        self.events.emit(SaveEvent(kind="state", epoch=state.epoch, step=self.step, path=str(path)))

    def _render_sample(self, epoch: int) -> None:
        if self.world.is_main:
            for slot in self.slots:
                if slot.parking is not None:
                    slot.parking.unpark()
            path = render_training_sample(self.cfg, self.dataset, {
                slot.plan.expert.subfolder: slot.trainable.module for slot in self.slots}, self.layout, epoch)
            self.events.emit(SampleEvent(epoch=epoch, step=self.step, path=str(path)))
        barrier(self.world)


def _writing(write: Callable[[], Path], where: Path) -> Path:
    """Run a file write, turning a full disk into a TrainingError (atomic writes leave the old files intact)."""
    try:
        return write()
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise TrainingError(f"The disk is full: could not write {where}.",
                                "Free some space (older epochN folders, the cache, outputs) and resume: the last "
                                "saved state is intact.", exit_code=EXIT_DISK_FULL) from err
        raise


def memory_hint(run_cfg, bucket: Sequence[int]) -> str:
    """Settings that would lower GPU memory for a (frames, height, width) bucket, most effective first, skipping
    those already in use."""
    hints = []
    if not run_cfg.model.float8:
        hints.append("[model] transformer_dtype = 'float8' (halves the base weights)")
    if run_cfg.checkpointing_mode == "selective":
        hints.append("[studio] selective_checkpointing = false (full checkpointing)")
    elif not run_cfg.checkpointing_mode:
        hints.append("activation_checkpointing = true")
    if run_cfg.activation_checkpointing != "unsloth":
        hints.append("activation_checkpointing = 'unsloth' (saved activations in CPU memory)")
    if run_cfg.blocks_to_swap < 39:
        hints.append(f"blocks_to_swap = {min(39, run_cfg.blocks_to_swap + 10)} (more blocks in CPU memory)")
    if run_cfg.micro_batch_size_per_gpu > 1:
        hints.append("micro_batch_size_per_gpu = 1 (use gradient_accumulation_steps for a larger batch)")
    frames, height, width = bucket
    if frames > 33:
        hints.append(f"fewer frames: frame_buckets = [33] in the dataset TOML (now {frames})")
    if height * width > 480 * 480:
        hints.append(f"lower resolution: resolutions = [480] or less in the dataset TOML (now {width}x{height})")
    if not hints:
        return "This batch does not fit this GPU even at the lowest settings: use a GPU with more memory."
    return "Try: " + "; ".join(hints) + "."


def render_training_sample(run_cfg, dataset, transformers: dict[str, torch.nn.Module], layout: RunLayout,
                           epoch: int) -> Path:
    """Render the configured sample with the in-memory LoRA transformers ({pipeline component: module}; an expert
    not trained comes from the model folder); engine.generate restores their train mode."""
    from engine.generate.render import sample_with_transformer
    from engine.generate.request import GenerationRequest

    samples = run_cfg.studio.samples
    first = dataset.items[0]
    _, height, width = first.bucket
    image = (str(run_cfg.base_dir / Path(samples.image).expanduser()) if samples.image
             else str(_first_frame(first.clip, layout.first_frame_file)))
    prompt = samples.prompt or first.caption
    request = GenerationRequest(image=image, prompt=prompt, seed=run_cfg.studio.seed, steps=samples.steps,
                                guidance=samples.guidance_scale, frames=samples.frames, height=height, width=width)
    return sample_with_transformer(run_cfg.model.ckpt_path, transformers, request,
                                   layout.sample_file(epoch))


def _first_frame(clip: str | Path, out: Path) -> Path:
    """The clip's first frame as shown (engine.core.video), as a PNG (the default sample still)."""
    from PIL import Image

    try:
        info = probe_video(clip)
        (frame,) = read_frames(info, [0])
    except VideoError as err:
        raise TrainingError(f"Could not read the first frame of {clip} for the training sample: {err}",
                            "Set [studio.samples] image to a still image.") from None
    with atomic_path(out) as tmp:
        Image.fromarray(frame).save(tmp)
    return out
