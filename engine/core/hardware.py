"""What compute this machine has, for the header and for choosing presets."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_gib: float


def default_device() -> torch.device:
    """Where this process computes unless told otherwise: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def list_gpus() -> list[GpuInfo]:
    if not torch.cuda.is_available():
        return []
    return [
        GpuInfo(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 2**30)
        for i in range(torch.cuda.device_count())
    ]


def describe_device() -> str:
    """One line: 'NVIDIA H100 80GB HBM3 (79.1 GiB)', '2 x NVIDIA ...', or 'CPU (n cores)'."""
    gpus = list_gpus()
    if not gpus:
        import os

        return f"CPU ({os.cpu_count()} cores, no CUDA GPU)"
    first = gpus[0]
    count = f"{len(gpus)} x " if len(gpus) > 1 else ""
    return f"{count}{first.name} ({first.total_gib:.1f} GiB)"
