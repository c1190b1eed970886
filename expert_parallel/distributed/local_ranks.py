"""Run a function on N local processes joined by a gloo process group.

``run_local_ranks(fn, world, *args)`` spawns ``world`` fresh processes, initialises a gloo
group in each (file-store rendezvous), calls ``fn(rank, world, *args)`` and returns the
per-rank results in rank order (anything ``torch.save`` can store). The test harness and
the single-machine benchmarks use it; it is also the quickest way to try a layer at
EP > 1 on one CPU machine without a launcher.

Failure handling: a rank that raises makes the call raise ``RuntimeError`` with that
rank's traceback; a run still going after ``timeout`` seconds is killed and raises
``TimeoutError`` naming the ranks that hung, so a hang fails instead of stalling.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, tmpdir: str, threads: int, group_timeout_s: float,
               fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world)})
    path = os.path.join(tmpdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank,
                                world_size=world, timeout=timedelta(seconds=group_timeout_s))
        torch.save({"ok": True, "result": fn(rank, world, *args)}, path)
    except BaseException:  # noqa: BLE001 - hand every failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(fn: Callable, world: int, *args: Any, threads: int = 1, timeout: float = 300.0,
                    group_timeout_s: float = 60.0, safe_types: Sequence[type] = ()) -> list:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each on its own process.

    ``fn`` must be importable (module level) since processes are spawned; ``threads`` sets
    each rank's intra-op threads; ``group_timeout_s`` bounds every collective. Results are
    read back with ``torch.load(weights_only=True)``: tensors, containers and primitives,
    plus the classes in ``safe_types`` (e.g. ``MoEStats``); nothing else is unpickled."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world, tmpdir, threads, group_timeout_s, fn, args))
                 for r in range(world)]
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
        for r in range(world):
            path = os.path.join(tmpdir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {procs[r].exitcode} and no result")
                continue
            with torch.serialization.safe_globals(list(safe_types)):
                payload = torch.load(path, weights_only=True)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {r}:\n{payload['error']}")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results


__all__ = ["run_local_ranks"]
