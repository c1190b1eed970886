"""Run a function on N local processes joined by a gloo process group.

``run_local_ranks(fn, world, *args)`` spawns ``world`` fresh processes, initialises a gloo
group in each (file-store rendezvous), calls ``fn(rank, world, *args)`` and returns the
per-rank results in rank order (anything ``torch.save`` can store). The test harness and
the single-machine benchmarks use it; it is also the quickest way to try a layer at
EP > 1 on one CPU machine without a launcher.

Failure handling: a rank that raises makes the call raise ``RuntimeError`` with that
rank's traceback; a run still going after ``timeout`` seconds is killed and raises
``TimeoutError`` naming the ranks that hung, so a hang fails instead of stalling.

:class:`LocalRankPool` keeps ``world`` such processes (and their process group) alive and
runs one function after another on them: starting 4 processes that import torch costs
seconds on a small machine, a task on live ones costs only its own work. Each task sees
a clean slate: the collective call counters reset and the process groups it created are
destroyed after it; a task that fails or hangs on any rank retires the pool (the next
call starts a fresh one), so a broken task never leaves ranks out of step.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _check_world(world: Any) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")


def _join_group(rank: int, world: int, store: str, threads: int, group_timeout_s: float) -> None:
    """This process as gloo rank ``rank`` of ``world`` (file-store rendezvous at ``store``),
    with the launcher environment a torchrun rank would see."""
    torch.set_num_threads(threads)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=group_timeout_s))


def _rank_main(rank: int, world: int, tmpdir: str, threads: int, group_timeout_s: float,
               fn: Callable, args: tuple) -> None:
    path = os.path.join(tmpdir, f"rank{rank}.pt")
    try:
        _join_group(rank, world, f"{tmpdir}/store", threads, group_timeout_s)
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
    _check_world(world)
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


def _pool_main(rank: int, world: int, store: str, threads: int, group_timeout_s: float,
               tasks: Any, results: Any) -> None:
    from .collectives import CALL_COUNTS

    _join_group(rank, world, store, threads, group_timeout_s)
    world_state = dist.distributed_c10d._world
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            task_id, fn, args = task
            CALL_COUNTS.clear()
            before = set(world_state.pg_map)
            try:
                payload = {"ok": True, "result": fn(rank, world, *args)}
            except BaseException:  # noqa: BLE001 - hand every failure to the parent
                payload = {"ok": False, "error": traceback.format_exc()}
            for group in [g for g in world_state.pg_map if g not in before]:
                dist.destroy_process_group(group)  # the task's groups: a clean slate for the next
            buf = io.BytesIO()
            torch.save(payload, buf)
            results.put((task_id, rank, buf.getvalue()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class LocalRankPool:
    """``world`` live gloo ranks that run ``fn(rank, world, *args)`` task after task (see
    the module docstring). ``run`` has :func:`run_local_ranks`' contract."""

    def __init__(self, world: int, threads: int = 1, group_timeout_s: float = 60.0,
                 safe_types: Sequence[type] = ()) -> None:
        _check_world(world)
        self.world, self.threads, self.group_timeout_s = world, threads, group_timeout_s
        self.safe_types = list(safe_types)
        self.procs: list = []
        self.next_id = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_pool_main, daemon=True,
                                  args=(r, self.world, f"{self._tmp.name}/store", self.threads,
                                        self.group_timeout_s, self.tasks[r], self.results))
                      for r in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, *args: Any, timeout: float = 300.0) -> list:
        if not self.procs:
            self._start()
        task_id, self.next_id = self.next_id, self.next_id + 1
        for q in self.tasks:
            q.put((task_id, fn, args))
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(got) < self.world:
                left = deadline - time.monotonic()
                if left <= 0 or any(not p.is_alive() for p in self.procs):
                    raise queue.Empty
                try:
                    tid, rank, blob = self.results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if tid == task_id:
                    with torch.serialization.safe_globals(self.safe_types):
                        got[rank] = torch.load(io.BytesIO(blob), weights_only=True)
        except queue.Empty:
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
            self.close()
            if dead:
                raise RuntimeError(f"distributed run failed: ranks {dead} exited") from None
            raise TimeoutError(f"ranks {sorted(set(range(self.world)) - set(got))} did not finish "
                               f"within {timeout}s") from None
        errors = [f"rank {r}:\n{p['error']}" for r, p in sorted(got.items()) if not p["ok"]]
        if errors:
            self.close()  # the ranks may be out of step: start afresh next time
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return [got[r]["result"] for r in range(self.world)]

    def close(self) -> None:
        for q, p in zip(getattr(self, "tasks", []), self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()
            del self._tmp


__all__ = ["run_local_ranks", "LocalRankPool"]
