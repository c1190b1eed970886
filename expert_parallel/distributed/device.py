"""The one place that decides device, communication backend and compute precision.

Everything else in the project asks this module, so the same code runs on CPU with gloo
and on CUDA with NCCL with no change. GPU-specific branches stay here and stay thin.

Precision (``dtype`` = ``auto`` | ``bf16`` | ``fp32``, see ``docs/PRECISION.md``):
``auto`` is bf16 autocast where the device computes bf16 natively -- CUDA GPUs with
native bf16 (Ampere and later), CPUs with AVX512-BF16 or AMX-BF16 -- and fp32
elsewhere. The capability is detected once per device type and cached. Autocast only
changes what the matmuls compute in; master weights, optimizer state, the router, the
combine and gradient reduction stay fp32 either way.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import ContextManager

import torch

PRECISIONS = ("auto", "bf16", "fp32")
"""Accepted values of every ``dtype`` option (launcher and benchmarks)."""

# x86 feature flags (as /proc/cpuinfo spells them) that mean bf16 dot products in
# hardware: AVX512-BF16 (vdpbf16ps; Cooper Lake, Zen 4+) and AMX-BF16 tiles (Sapphire
# Rapids+). oneDNN, which computes torch's CPU bf16 matmuls, uses either when present;
# without them bf16 is emulated through fp32 and is slower than fp32 itself.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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


# -- precision ------------------------------------------------------------------------
def _read_cpu_flags() -> frozenset[str]:
    """Feature flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none,
    e.g. macOS: ``auto`` then means fp32)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` computes bf16 natively, and why (detected once, cached;
    tests clear the cache with ``native_bf16.cache_clear()``)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"CUDA device {torch.cuda.get_device_name()} has native bf16"
        return False, f"CUDA device {torch.cuda.get_device_name()} has no native bf16 (pre-Ampere)"
    if device_type == "cpu":
        flags = _read_cpu_flags()
        found = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
        if found:
            return True, f"CPU has {'/'.join(found)}"
        return False, f"CPU has none of {'/'.join(NATIVE_BF16_CPU_FLAGS)} (bf16 would be emulated)"
    return False, f"no native-bf16 detection for device type {device_type!r}"


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in, resolved from the user's ``dtype`` choice."""

    name: str
    """``bf16`` (bf16 autocast) or ``fp32`` (no autocast)."""
    requested: str
    """What the user asked for: ``auto``, ``bf16`` or ``fp32``."""
    reason: str
    """Why ``name`` was chosen (for logs and summaries)."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self, device_type: str) -> ContextManager:
        """The autocast context of this precision; fp32 *disables* autocast, so an
        outer autocast cannot turn an fp32 run into a mixed one."""
        if self.name == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") \
            else contextlib.nullcontext()

    def to_dict(self) -> dict:
        return {"dtype": self.name, "requested": self.requested, "reason": self.reason}


def resolve_precision(dtype: str, device: torch.device | str) -> Precision:
    """``auto`` -> bf16 where ``device`` computes bf16 natively, else fp32; ``bf16`` and
    ``fp32`` are taken as asked (bf16 on a device without it runs, emulated and slow)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {dtype!r}")
    device_type = torch.device(device).type
    if dtype != "auto":
        native, why = native_bf16(device_type) if dtype == "bf16" else (True, "")
        reason = "requested" + ("" if native else f" ({why})")
        return Precision(dtype, dtype, reason)
    native, why = native_bf16(device_type)
    return Precision("bf16" if native else "fp32", "auto", why)
