"""``MoEProfiler``: per-layer, per-step phase times, bytes, drops and imbalance.

Usage (every rank of the job calls the same methods with the same step numbers)::

    profiler = MoEProfiler(model.moe_layers(), groups,
                           ProfilerConfig(start_step=10, num_steps=5, out_dir=run_dir))
    for step in range(max_steps):
        profiler.step_begin(step)
        t0 = time.perf_counter(); train_step(); dt = time.perf_counter() - t0
        record = profiler.step_end(step, step_time_s=dt)   # None outside the window
        if record: log(record["a2a_share"])
    profiler.close()   # writes the markdown table; closes TensorBoard

Every rank must call ``step_begin``/``step_end`` for the same steps (``step_end`` is a
collective inside the window). A timer the layers held before the window (e.g. a
launcher's own ``PhaseTimer``) is put back afterwards.

Cost model. Outside the window nothing is attached: the layers keep whatever timer
they had (``NULL_TIMER`` by default: no cost at all), no
hook is registered, and ``step_begin``/``step_end`` return at once, so a disabled
profiler adds no collective, no host sync and no autograd node. Inside the window each
layer gets its own :class:`PhaseTimer` plus a forward pre/post hook (wall clock on CPU,
CUDA events on GPU: no sync in the step). ``step_end`` then does the only expensive
work, once per profiled step and outside the hot path: reads the events (CUDA sync),
reads the layers' routing stats to the host, and issues ONE all-gather over the
data-parallel group (all ranks) of a flat float64 vector per rank, from which every rank
builds the same record: per-rank phase times (mean, max, slowest rank), bytes and GB/s,
per-rank per-expert routed/kept counts, drops, capacity slack, and load imbalance.

Outputs: ``records`` (list of dicts), ``<out_dir>/moe_profile.jsonl`` (one JSON record
per profiled step, rank 0), TensorBoard scalars under ``moe/`` (rank 0, when
``tensorboard=True`` or a ``writer`` is given) and :func:`markdown_table` of the window.
Definitions are in :mod:`expert_parallel.profiling.records`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..distributed.collectives import all_gather_rows
from ..moe.stats import MoEStats
from .records import build_record, markdown_table, per_rank_vector, tensorboard_scalars
from .timer import NULL_TIMER, PhaseTimer


@dataclass(frozen=True)
class ProfilerConfig:
    """When to profile and where the results go."""

    start_step: int = 0
    """First step (as numbered by the caller) that is profiled."""
    num_steps: int = 1
    """Number of consecutive profiled steps (0 disables the profiler entirely)."""
    out_dir: Optional[str] = None
    """Rank 0 appends ``moe_profile.jsonl`` and writes ``moe_profile.md`` here (None: don't)."""
    tensorboard: bool = False
    """Rank 0 writes TensorBoard scalars to ``<out_dir>/tb_moe`` (needs out_dir)."""

    def __post_init__(self) -> None:
        for name in ("start_step", "num_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            raise TypeError(f"out_dir must be a str or None, got {self.out_dir!r}")
        if not isinstance(self.tensorboard, bool):
            raise TypeError(f"tensorboard must be a bool, got {self.tensorboard!r}")
        if self.tensorboard and self.out_dir is None:
            raise ValueError("tensorboard=True needs out_dir, got out_dir=None")


class MoEProfiler:
    """Profiles the MoE layers named in ``layers`` for a window of steps.

    Args:
        layers: ``{name: MoELayer}`` (e.g. ``model.moe_layers()``); same names on all ranks.
        groups: the job's :class:`ParallelGroups`; records aggregate over ``dp_group``.
        config: the window and outputs.
        device: where the layers compute (CUDA events when it is a GPU).
        writer: an existing TensorBoard ``SummaryWriter`` to log into (rank 0).
    """

    def __init__(self, layers: Mapping[str, Any], groups: Any,
                 config: ProfilerConfig = ProfilerConfig(), device: Optional[torch.device] = None,
                 writer: Any = None) -> None:
        if not isinstance(config, ProfilerConfig):
            raise TypeError(f"config must be a ProfilerConfig, got {type(config).__name__}")
        if not layers:
            raise ValueError("layers must name at least one MoE layer, got an empty mapping")
        self.layers = dict(layers)
        self.groups = groups
        self.config = config
        first = next(iter(self.layers.values()))
        self.device = device if device is not None else first.router.weight.device
        self.records: list[dict] = []
        self._timers: dict[str, PhaseTimer] = {}
        self._stats: dict[str, list[MoEStats]] = {}
        self._hooks: list[Any] = []
        self._previous: dict[str, Any] = {}
        self._writer = writer
        self._own_writer = False
        self._is_rank0 = groups.rank == 0

    # -- window ---------------------------------------------------------------------
    def active(self, step: int) -> bool:
        c = self.config
        return c.start_step <= step < c.start_step + c.num_steps

    def step_begin(self, step: int) -> None:
        """Attach timers and hooks if ``step`` is in the window (no communication)."""
        if not self.active(step):
            return
        if not self._timers:
            self._attach()
        for timer in self._timers.values():
            timer.reset()
        self._stats = {name: [] for name in self.layers}

    def step_end(self, step: int, step_time_s: Optional[float] = None) -> Optional[dict]:
        """Collect, aggregate over ranks (one all-gather) and emit the record of ``step``.
        Returns None (and does nothing) outside the window. ``step_time_s`` is this
        rank's wall time of the whole step, used for the all-to-all share."""
        if not self.active(step) or not self._timers:
            return None
        rows, meta = [], {}
        for name, layer in self.layers.items():
            timer = self._timers[name]
            passes = timer.collect_passes()
            stats = self._stats.get(name) or []
            local = MoEStats.accumulate(stats) if stats else None
            vec, meta[name] = per_rank_vector(layer, passes, timer, local)
            rows.append(vec)
        rows.append(torch.tensor([float(step_time_s or 0.0)], dtype=torch.float64))
        mine = torch.cat(rows).to(self.device)
        gathered = all_gather_rows(mine, self.groups.dp_group)
        table = torch.stack([g.cpu() for g in gathered]).tolist()  # [world][features]
        record = build_record(step, table, meta, self.layers, self.groups)
        self.records.append(record)
        if self._is_rank0:
            self._emit(record)
        if step + 1 >= self.config.start_step + self.config.num_steps:
            self._detach()
        return record

    def close(self) -> None:
        """Detach everything; rank 0 writes the markdown table and closes TensorBoard."""
        self._detach()
        if self._is_rank0 and self.config.out_dir and self.records:
            with open(os.path.join(self.config.out_dir, "moe_profile.md"), "w") as fh:
                fh.write(markdown_table(self.records) + "\n")
        if self._own_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- internals ------------------------------------------------------------------
    def _attach(self) -> None:
        for name, layer in self.layers.items():
            timer = PhaseTimer(self.device)
            self._timers[name] = timer
            self._previous[name] = layer.timer  # restored after the window
            layer.set_timer(timer)
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(name, timer)))
            self._hooks.append(layer.register_forward_hook(self._post_hook(name, timer)))

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for name, layer in self.layers.items():
            if name in self._timers:
                layer.set_timer(self._previous.pop(name, NULL_TIMER))
        self._timers.clear()

    @staticmethod
    def _pre_hook(name: str, timer: PhaseTimer):
        def hook(module: Any, args: tuple) -> None:
            timer.span_begin("forward")  # the layer itself drops the backward marks
        return hook

    def _post_hook(self, name: str, timer: PhaseTimer):
        def hook(module: Any, args: tuple, output: Any) -> Any:
            timer.span_end("forward")
            self._stats.setdefault(name, []).append(output.stats)
            return output
        return hook

    def _emit(self, record: dict) -> None:
        out_dir = self.config.out_dir
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "moe_profile.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._writer is None and self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(out_dir or ".", "tb_moe"))
            self._own_writer = True
        if self._writer is not None:
            for tag, value in tensorboard_scalars(record).items():
                self._writer.add_scalar(tag, value, record["step"])
            self._writer.flush()


__all__ = ["MoEProfiler", "ProfilerConfig"]
