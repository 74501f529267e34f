"""Parking a model in CPU memory while another one uses the GPU (Wan 2.2's inactive expert while training).

`park()` moves every tensor of the model that sits on the GPU into pinned CPU memory and frees its GPU memory;
`unpark()` copies them back into the same tensor objects, so optimizers and hooks holding them keep working. Frozen
weights are copied to the host once (they never change); trainable parameters and the optimizer's state (set
`optimizer`) are copied at every park. Tensors a BlockSwapper already streams from CPU memory are left to it.
On a CPU both are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelParking:
    """Moves one model's GPU tensors (and its optimizer's state) to pinned CPU memory and back."""

    def __init__(self, model: nn.Module, device: torch.device | str, block_swapper=None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.device = torch.device(device)
        self.model, self.optimizer = model, optimizer
        self._swapped = {id(t) for store in getattr(block_swapper, "stores", {}).values() for t, _ in store}
        frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
        self._frozen = [t for t in dict.fromkeys(frozen) if id(t) not in self._swapped]
        self._host: dict[int, torch.Tensor] = {}  # id(tensor) -> its pinned copy
        self._parked: list[torch.Tensor] = []
        self.parked = False

    def _live(self) -> list[torch.Tensor]:
        """Tensors that change while training: the LoRA parameters and the optimizer's state."""
        live = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer is not None:
            live += [v for state in self.optimizer.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor)]
        return live

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._host.values())

    def park(self) -> None:
        """GPU tensors -> pinned CPU memory; their GPU memory is freed."""
        if self.parked or self.device.type != "cuda":
            return
        frozen_ids = {id(t) for t in self._frozen}
        self._parked = []
        for tensor in [*self._frozen, *self._live()]:
            if tensor.device.type != "cuda" or tensor.numel() == 0:
                continue
            host = self._host.get(id(tensor))
            if host is None:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor.detach())
                self._host[id(tensor)] = host
            elif id(tensor) not in frozen_ids:
                host.copy_(tensor.detach(), non_blocking=True)
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)
            self._parked.append(tensor)
        torch.cuda.current_stream(self.device).synchronize()  # the copies are done before the memory is reused
        self.parked = True

    def unpark(self) -> None:
        """Copy the parked tensors back onto the GPU."""
        if not self.parked:
            return
        for tensor in self._parked:
            tensor.data = self._host[id(tensor)].to(self.device, non_blocking=True)
        self._parked = []
        self.parked = False

    @contextmanager
    def live_resident(self) -> Iterator[None]:
        """The LoRA parameters and optimizer state on the GPU for a while (to save them), the frozen weights still
        parked; parked again afterwards."""
        live = {id(t) for t in self._live()}
        back = [t for t in self._parked if id(t) in live] if self.parked else []
        for tensor in back:
            tensor.data = self._host[id(tensor)].to(self.device, non_blocking=True)
        try:
            yield
        finally:
            for tensor in back:
                self._host[id(tensor)].copy_(tensor.detach(), non_blocking=True)
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)
            if back:
                torch.cuda.current_stream(self.device).synchronize()
