"""Data parallel training: this process's rank, collective decisions, the gradient steppers and the data stream.

Under `deepspeed --num_gpus N -m engine.training ...` (or torchrun) the LoRA parameters go to a DeepSpeed engine
(ZeRO stage 0: plain data parallel; a LoRA's optimizer state is too small to be worth sharding) that averages
gradients, accumulates, clips and steps. The frozen base model stays outside DeepSpeed, so it is never broadcast or
cast, and float8 storage and block swap keep working. Without a launcher the LocalStepper does the same in-process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch

from engine.training.events import TrainingError

COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (from the launcher's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def start_world() -> tuple[World, torch.device]:
    """Join the process group when launched by deepspeed/torchrun; pick this rank's device."""
    world = World.from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world.distributed:
        import deepspeed

        # Ranks wait for each other while one caches its share, saves, or renders a sample: allow hours, not minutes.
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return world, device


def all_ranks_mean(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world.world_size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks stop together."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


class LocalStepper:
    """Gradient accumulation, clipping and the optimizer step in one process."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], accumulation: int,
                 clipping: float):
        self.optimizer, self.parameters = optimizer, parameters
        self.accumulation, self.clipping = accumulation, clipping

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def micro_step(self, boundary: bool) -> None:
        if not boundary:
            return
        if self.clipping:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.clipping)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedStepper:
    """The same through a DeepSpeed engine that holds only the LoRA parameters: it averages gradients over ranks."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], accumulation: int,
                 clipping: float, micro_batch_size: int):
        import deepspeed

        self.engine, *_ = deepspeed.initialize(
            model=torch.nn.ParameterList(parameters), optimizer=optimizer, dist_init_required=False,
            config={"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": accumulation,
                    "gradient_clipping": clipping, "zero_optimization": {"stage": 0},
                    "steps_per_print": 2**62, "wall_clock_breakdown": False})

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/accumulation; all-reduces (averages) at the boundary

    def micro_step(self, boundary: bool) -> None:
        self.engine.step()  # counts micro-batches itself: steps the optimizer only at the accumulation boundary



# ========================================================================================== the step arithmetic

def micro_batches_per_rank(bucket_sizes: Iterable[int], *, batch_size: int, world_size: int) -> int:
    """Micro-batches each rank trains per epoch: every bucket (its items x num_repeats) cut into batches of
    `batch_size` (a batch never mixes buckets; the last one of a bucket may be short), and those batches shared out
    over `world_size` ranks, the list padded by wrapping round so every rank gets as many (CachedDataset.batch_order
    builds exactly these batches)."""
    batches = sum(-(-size // batch_size) for size in bucket_sizes)
    return -(-batches // world_size)


def planned_steps(micro_batches_per_epoch: int, *, epochs: int, accumulation: int, max_steps: int | None) -> int:
    """The optimizer steps a run takes: `epochs` x this rank's micro-batches per epoch, `accumulation` micro-batches a
    step (a last partial step is dropped; at least 1), capped by max_steps when set."""
    steps_in_epochs = max(1, epochs * micro_batches_per_epoch // accumulation)
    return min(max_steps, steps_in_epochs) if max_steps else steps_in_epochs


class DataStream:
    """This rank's micro-batches, epoch after epoch, in the order `batch_order` gives; positioned by a global index.

    Rank r of W holds every W-th batch of the global order, so local micro-batch i is global micro-batch i*W + r.
    """

    def __init__(self, dataset, *, seed: int, batch_size: int, world: World):
        self.dataset, self.seed, self.batch_size, self.world = dataset, seed, batch_size, world
        self._orders: dict[int, list[list[int]]] = {}
        self.per_epoch = micro_batches_per_rank(dataset.bucket_counts().values(), batch_size=batch_size,
                                                world_size=world.world_size)
        if self.per_epoch == 0:
            raise TrainingError("The dataset gives no batch to this rank.",
                                "Add clips, lower micro_batch_size_per_gpu or use fewer GPUs.")

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            self._orders = {epoch: self.dataset.batch_order(epoch, self.seed, self.batch_size, rank=self.world.rank,
                                                            world_size=self.world.world_size)}
        return self._orders[epoch]

    def batch(self, local_index: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of this rank's `local_index`-th micro-batch (0-based, across epochs)."""
        epoch = local_index // self.per_epoch + 1
        return epoch, self.order(epoch)[local_index % self.per_epoch]

    def global_index(self, local_index: int) -> int:
        return local_index * self.world.world_size + self.world.rank


