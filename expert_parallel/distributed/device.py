"""The one place that decides device and communication backend.

Everything else in the project asks this module, so the same code runs on CPU with gloo
and on CUDA with NCCL with no change. GPU-specific branches stay here and stay thin.
"""

from __future__ import annotations

import os

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_backend() -> str:
    """NCCL when CUDA is present, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"


def local_device(local_rank: int | None = None) -> torch.device:
    """The device this process computes on: ``cuda:<local_rank>`` or ``cpu``."""
    if not cuda_available():
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU, none (fp32) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None
