"""A small harness that runs a function on N real gloo ranks (separate processes).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group in each (file-store rendezvous, bounded timeout), calls
``fn(rank, world_size, *args)`` and returns the list of per-rank return values
(anything ``torch.save`` can store). A rank that raises makes ``run_ranks`` raise with
that rank's traceback; a run that exceeds ``timeout`` is killed and fails, so a hang
fails fast instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from expert_parallel.distributed.local_ranks import run_local_ranks


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks, 1 thread each, every
    collective bounded by 60 s (see :func:`expert_parallel.distributed.local_ranks.run_local_ranks`)."""
    from expert_parallel.moe.stats import MoEStats

    return run_local_ranks(fn, world_size, *args, threads=1, timeout=timeout, group_timeout_s=60.0,
                           safe_types=(MoEStats,))


HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Count Tensor methods that read device data back to the host (syncs)."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            counter["n"] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
