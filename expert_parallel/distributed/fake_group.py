"""A one-process stand-in for an N-rank job: the "mirror" process group.

``with fake_world(world_size=8, rank=5) as world:`` initialises ``torch.distributed``
with the ``mirror`` backend in this process alone. ``ParallelGroups.build``, the
consensus check, the dispatchers and ``MoEStats.reduce`` then run their multi-rank code
paths -- shape logic, split arithmetic, metadata, every collective -- with no peer
processes. It works on CPU and on CUDA tensors, issues no host sync of its own, and is
what the CPU suite (``tests/distributed/test_fake_group.py``) and ``scripts/gpu_check``
(check 2, multi-rank host syncs on one GPU) use.

Why not ``torch.testing._internal.distributed.fake_pg``: its collectives leave their
outputs untouched (uninitialised memory), so our count exchange would read garbage
split sizes. Here every collective answers *as if every peer were this rank* (same
tokens, same routing), which keeps the split arithmetic self-consistent:

=======================  =========================================================
``all_gather``           every slot receives this rank's tensor
``all_to_all_single``    *mirror*: block r receives the block this rank sends to
                         itself (what peer r would send, were it this rank). That
                         needs ``output_splits[r] == input_splits[me]`` for every r,
                         which holds for each exchange whose splits come from a
                         mirrored count exchange (the dispatch direction). Otherwise
                         (the reverse direction, for which no consistent peer data
                         exists) *tile*: the output is the input's rows repeated
                         cyclically (zeros for an empty input), finite and
                         deterministic. Each call's mode is logged.
``all_reduce``           as if W ranks held this value: SUM x W, AVG/MIN/MAX x
``broadcast``/``barrier``  no-ops (the source holds this rank's value)
=======================  =========================================================

Results are therefore not those of a real job (a rank's experts also compute the rows
its peers would own); tests check shapes, splits and metadata, never values against a
reference. ``FakeWorld.calls`` logs every collective (kind, group, splits, mode).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions,
    AllreduceOptions,
    AllToAllOptions,
    BarrierOptions,
    BroadcastOptions,
    ReduceOp,
    _create_work_from_future,
)
from torch.futures import Future

BACKEND = "mirror"


class FakeSplitError(ValueError):
    """A collective's splits do not add up to its tensors (a split-arithmetic bug)."""


@dataclass(frozen=True)
class Call:
    """One collective as the mirror group saw it."""

    kind: str
    """``all_to_all_single`` / ``all_gather`` / ``all_reduce`` / ``broadcast`` / ``barrier``."""
    group_size: int
    group_rank: int
    input_splits: tuple[int, ...] = ()
    output_splits: tuple[int, ...] = ()
    mode: str = ""
    """How an all-to-all filled its output: ``mirror`` or ``tile``."""
    shape: tuple[int, ...] = ()
    dtype: Optional[torch.dtype] = None
    device: str = ""


@dataclass
class FakeWorld:
    """The job a ``fake_world`` block pretends to be part of."""

    world_size: int
    rank: int
    calls: list[Call] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]


_WORLD: Optional[FakeWorld] = None


def _done() -> dist.Work:
    fut: Future = Future()
    fut.set_result([])  # no tensors in the value: nothing for the future to track
    return _create_work_from_future(fut)


def _splits(given: Sequence[int], rows: int, size: int, what: str) -> list[int]:
    if not given:
        if rows % size:
            raise FakeSplitError(f"{what}: {rows} rows do not split equally over {size} ranks")
        return [rows // size] * size
    if len(given) != size or sum(given) != rows or min(given) < 0:
        raise FakeSplitError(f"{what} splits {list(given)} do not match {rows} rows over "
                             f"{size} ranks")
    return list(given)


class MirrorGroup(dist.ProcessGroup):
    """A process group of ``size`` ranks whose peers all behave like this rank."""

    def __init__(self, rank: int, size: int, world: FakeWorld) -> None:
        super().__init__(rank, size)
        self._rank, self._size, self._world = rank, size, world

    def size(self) -> int:
        return self._size

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    def _log(self, kind: str, t: Optional[torch.Tensor] = None, **kw) -> None:
        extra = {} if t is None else {"shape": tuple(t.shape), "dtype": t.dtype, "device": str(t.device)}
        self._world.calls.append(Call(kind, self._size, self._rank, **kw, **extra))

    @torch.no_grad()
    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                          opts: AllToAllOptions = AllToAllOptions()) -> dist.Work:
        n, me = self._size, self._rank
        out_s = _splits(output_split_sizes, output.shape[0], n, "all_to_all_single output")
        in_s = _splits(input_split_sizes, input.shape[0], n, "all_to_all_single input")
        # .detach(): the copies must not show up as in-place ops to autograd.
        out, inp = output.detach(), input.detach()
        if all(s == in_s[me] for s in out_s):
            mode, start = "mirror", sum(in_s[:me])
            offset = 0
            for size in out_s:
                out[offset : offset + size].copy_(inp[start : start + size])
                offset += size
        else:
            mode = "tile"
            if inp.shape[0] == 0:
                out.zero_()
            elif out.shape[0]:
                rows = torch.arange(out.shape[0], device=inp.device) % inp.shape[0]
                out.copy_(inp.index_select(0, rows))
        self._log("all_to_all_single", input, input_splits=tuple(in_s), output_splits=tuple(out_s),
                  mode=mode)
        return _done()

    @torch.no_grad()
    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: AllgatherOptions = AllgatherOptions()) -> dist.Work:
        for outs, inp in zip(output_tensors, input_tensors):
            for t in outs:
                t.detach().copy_(inp)
            self._log("all_gather", inp)
        return _done()

    @torch.no_grad()
    def allreduce(self, tensors: list[torch.Tensor],
                  opts: AllreduceOptions = AllreduceOptions()) -> dist.Work:
        op = getattr(opts.reduceOp, "op", opts.reduceOp)  # the RedOpType inside a ReduceOp
        for t in tensors:
            if op == ReduceOp.SUM:
                t.detach().mul_(self._size)
            elif op not in (ReduceOp.AVG, ReduceOp.MIN, ReduceOp.MAX):
                raise NotImplementedError(f"mirror group: all_reduce op {op} is not simulated")
            self._log("all_reduce", t)
        return _done()

    def broadcast(self, tensors: list[torch.Tensor],
                  opts: BroadcastOptions = BroadcastOptions()) -> dist.Work:
        self._log("broadcast")
        return _done()

    def barrier(self, opts: BarrierOptions = BarrierOptions()) -> dist.Work:
        self._log("barrier")
        return _done()


def _create(store: dist.Store, rank: int, size: int, timeout) -> MirrorGroup:
    if _WORLD is None:
        raise RuntimeError("the mirror backend is only available inside fake_world()")
    return MirrorGroup(rank, size, _WORLD)


if not hasattr(dist.Backend, BACKEND.upper()):
    dist.Backend.register_backend(BACKEND, _create, devices=["cpu", "cuda"])


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[FakeWorld]:
    """Be rank ``rank`` of a ``world_size``-rank job in this process alone (see the
    module docstring). Refuses to replace a real initialised process group; tears the
    fake one down on exit."""
    global _WORLD
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if dist.is_initialized():
        raise RuntimeError("fake_world: torch.distributed is already initialised in this process")
    world = FakeWorld(world_size, rank)
    _WORLD = world
    try:
        dist.init_process_group(BACKEND, store=dist.HashStore(), rank=rank, world_size=world_size)
        yield world
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _WORLD = None


__all__ = ["BACKEND", "Call", "FakeSplitError", "FakeWorld", "MirrorGroup", "fake_world"]
