"""Shared plumbing for the benchmark scripts: ranks, timing, peak memory, reports.

* :func:`spawn` runs ``fn(rank, world, *args)`` on ``world`` fresh processes joined by a
  gloo process group (file rendezvous), ``threads`` intra-op threads each, and returns
  the per-rank results; a hung run is killed at ``timeout``.
* :func:`timed_max` times a callable on every rank after a barrier and returns the
  slowest rank's time (an EP layer is as slow as its slowest rank).
* :func:`peak_alloc_bytes` measures the peak of live tensor bytes allocated during a
  callable. Method: ``torch.profiler`` with ``profile_memory=True`` records every CPU
  allocation (+bytes) and free (-bytes) made through torch's allocator, in order; the
  peak of their running sum is the high-water mark of tensor memory above the level at
  entry -- the CPU analogue of ``torch.cuda.max_memory_allocated() - allocated_at_start``.
  It counts tensors only (not Python objects, not the allocator's cached pages) and is
  exact and repeatable, unlike RSS, which glibc's lazy page return makes noisy.
* :func:`environment` and :func:`write_report`: every result records its config,
  versions, hardware and command, and comes with a markdown table and PNG plots.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from expert_parallel.distributed.local_ranks import run_local_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(fn: Callable, world: int, *args: Any, threads: int = 1, timeout: float = 3600.0) -> list:
    """Run ``fn`` on ``world`` gloo ranks; returns their results in rank order."""
    return run_local_ranks(fn, world, *args, threads=threads, timeout=timeout, group_timeout_s=600.0)


def timed_max(fn: Callable[[], Any], group: Optional[Any] = None) -> float:
    """Seconds ``fn`` took on the slowest rank (barrier before, max-reduce after)."""
    if dist.is_initialized():
        dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed)


def peak_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak live tensor bytes allocated while ``fn`` runs (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return int(peak)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def environment() -> dict:
    """Versions and hardware of this run."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            versions[mod] = None
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    hardware = {"machine": platform.machine(), "cpu_model": cpu_model, "cpus": os.cpu_count(),
                "memory_gib": mem_gb, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        # Other jobs on the machine skew timings; record how busy it was.
        hardware["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return {"versions": versions, "hardware": hardware, "command": " ".join([sys.executable, *sys.argv]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_report(out: str, report: dict, markdown: list[str],
                 plot: Optional[Callable[[Any], None]] = None) -> None:
    """Write ``out`` (JSON), ``<stem>.md`` and, when ``plot`` is given, ``<stem>.png``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(markdown) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot(plt)
        plt.savefig(stem + ".png", dpi=90, bbox_inches="tight")
        plt.close("all")
