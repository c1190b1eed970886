"""What the checks share: the run context, results, timing, comparison, environment.

CUDA-only branches are kept here and kept thin: a check asks ``ctx.cuda`` and uses the
helpers below, which do the CUDA thing on a GPU and its CPU stand-in otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO = PACKAGE_DIR.parent
"""The checkout this package lives in (``launch/``, ``benchmarks/`` beside it)."""


@dataclass(frozen=True)
class Context:
    """Where a check runs: ``cuda:0``, or the CPU in a dry run (tiny sizes)."""

    device: torch.device
    dry_run: bool
    partial_path: Optional[str] = None
    """Where :meth:`save_partial` writes (the child's result file)."""

    def save_partial(self, res: dict) -> None:
        """Write what is known so far: if the process dies next (a device-side assert
        kills it), the parent reports this instead of nothing."""
        if self.partial_path:
            Path(self.partial_path).write_text(json.dumps(res, indent=1, default=str))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def bf16(self, enabled: bool = True, cache: bool = True) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device (``enabled=False``: autocast explicitly off)."""
        if not enabled:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def make_context(dry_run: bool, partial_path: Optional[str] = None) -> Context:
    if dry_run:
        return Context(torch.device("cpu"), True, partial_path)
    torch.cuda.set_device(0)
    return Context(torch.device("cuda", 0), False, partial_path)


def result(status: str, summary: str, **figures: Any) -> dict:
    """A check's result: ``status`` in pass / fail / not run / error, a one-line summary."""
    if status not in ("pass", "fail", "not run", "error"):
        raise ValueError(f"status must be pass, fail, not run or error, got {status!r}")
    return {"status": status, "summary": summary, **figures}


def _inside(frames: list) -> list:
    return [f for f in frames if f.filename.startswith(str(PACKAGE_DIR)) and "gpu_check" not in f.filename]


def package_site(tb: Any) -> str:
    """The innermost frame of a traceback inside this package (else the innermost)."""
    frames = traceback.extract_tb(tb)
    inside = _inside(frames)
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    path = frame.filename[len(str(PACKAGE_DIR)) + 1:] if inside else frame.filename
    return f"{path}:{frame.lineno} ({frame.name})"


def error_site(err: BaseException) -> str:
    """``site: message`` of the first exception in ``err``'s chain raised inside this
    package (a failed CUDA-graph capture re-raises from ``torch.cuda.graph.__exit__``,
    hiding the line of ours that broke it in ``__context__``)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in reversed(chain):  # the original first
        if _inside(traceback.extract_tb(e.__traceback__)):
            return f"{package_site(e.__traceback__)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    first = chain[0]
    return f"{package_site(first.__traceback__)}: {str(first).splitlines()[0] if str(first) else type(first).__name__}"


class Stopwatch:
    """Device time of a region: CUDA events on a GPU, ``perf_counter`` on CPU. Read
    :meth:`seconds` after the region (it synchronises on a GPU)."""

    def __init__(self, ctx: Context) -> None:
        self.cuda = ctx.cuda
        self._start: Any = None
        self._stop: Any = None

    def start(self) -> "Stopwatch":
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def stop(self) -> "Stopwatch":
        if self.cuda:
            self._stop = torch.cuda.Event(enable_timing=True)
            self._stop.record()
        else:
            self._stop = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self.cuda:
            self._stop.synchronize()
            return self._start.elapsed_time(self._stop) / 1e3
        return self._stop - self._start


@contextlib.contextmanager
def timed(ctx: Context, into: list) -> Iterator[None]:
    """Append the region's device seconds to ``into``."""
    watch = Stopwatch(ctx).start()
    yield
    into.append(watch.stop().seconds())


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 on the host (0 when both are zero)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    denom = float(w.norm())
    diff = float((g - w).norm())
    return diff / denom if denom > 0 else diff


def step(layer: Any, x: torch.Tensor, cot: torch.Tensor) -> dict:
    """One forward + backward of ``layer`` on a fresh leaf copy of ``x``: output, input
    and parameter gradients, routed / kept counts."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ((out.output.float() * cot.float()).sum() + out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {"output": out.output.detach(), "x_grad": x.grad.detach(), "grads": grads,
            "routed": out.stats.routed_E.detach().cpu(), "kept": out.stats.kept_E.detach().cpu()}


def environment() -> dict:
    """Versions and hardware of this run (no CUDA call when CUDA is absent)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "nccl": None, "deepspeed": None}
    try:
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as err:  # noqa: BLE001 - a report field, never fatal
        versions["nccl"] = f"unavailable: {err}"
    try:
        import importlib.metadata as md

        versions["deepspeed"] = md.version("deepspeed")
    except Exception:  # noqa: BLE001
        pass
    hw: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            hw["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                               "memory_gib": round(p.total_memory / 2**30, 1),
                               "multiprocessors": p.multi_processor_count})
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            hw["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            hw["driver"] = None
    return {"versions": versions, "hardware": hw, "command": " ".join([sys.executable, *sys.argv]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


BF16_PEAK_TFLOPS = (
    # (substring of torch.cuda.get_device_name(), dense bf16 tensor-core peak, TFLOP/s)
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
)
"""Vendor datasheet numbers (dense, no sparsity). First match wins: order matters."""


def bf16_peak_tflops(name: Optional[str]) -> Optional[float]:
    for key, peak in BF16_PEAK_TFLOPS:
        if name and key in name:
            return peak
    return None


__all__ = ["BF16_PEAK_TFLOPS", "Context", "REPO", "Stopwatch", "bf16_peak_tflops", "environment", "error_site",
           "make_context", "median", "package_site", "rel_err", "result", "step", "timed"]
