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
import os
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, tmpdir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmpdir}/store",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(tmpdir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, tmpdir, fn, args), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(tmpdir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {procs[r].exitcode} and no result")
                continue
            payload = torch.load(path, weights_only=False)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {r}:\n{payload['error']}")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results


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
