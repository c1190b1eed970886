"""A small harness that runs a function on N real gloo ranks (separate processes).

``run_ranks(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on
``world_size`` real processes joined by a gloo process group (file-store rendezvous,
bounded timeout) and returns the list of per-rank return values (tensors, containers,
primitives, ``MoEStats``). The processes are a session-wide
:class:`~expert_parallel.distributed.local_ranks.LocalRankPool` per world size, kept alive
between calls (each call still gets fresh process groups and counters). A rank that
raises makes ``run_ranks`` raise with that rank's traceback; a run that exceeds
``timeout`` is killed and fails, so a hang fails fast instead of stalling the suite;
either retires the pool. ``fresh=True`` runs on newly spawned processes instead.
"""

from __future__ import annotations

import atexit
import contextlib
from typing import Any, Callable

import torch

from expert_parallel.distributed.local_ranks import LocalRankPool, run_local_ranks
from expert_parallel.moe.stats import MoEStats

_POOLS: dict[int, LocalRankPool] = {}


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, fresh: bool = False) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks, 1 thread each, every
    collective bounded by 60 s (see :mod:`expert_parallel.distributed.local_ranks`)."""
    if fresh:
        return run_local_ranks(fn, world_size, *args, threads=1, timeout=timeout, group_timeout_s=60.0,
                               safe_types=(MoEStats,))
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = LocalRankPool(world_size, threads=1, group_timeout_s=60.0,
                                                  safe_types=(MoEStats,))
    return pool.run(fn, *args, timeout=timeout)


@atexit.register
def close_pools() -> None:
    """Stop every pooled rank (a later ``run_ranks`` starts a new pool). Idle pooled ranks
    still cost CPU (gloo's background threads), so the suite closes them when it leaves
    a test folder (``tests/conftest.py``)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


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
