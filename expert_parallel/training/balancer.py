"""Live expert load balancing in the training loop (``--rebalance-every``).

Every ``rebalance_every`` steps the loop plans a new placement table per MoE layer from
the last ``rebalance_window`` steps' load (kept rows per logical expert, already reduced
over the data-parallel group by the loop's one stats all-reduce, so every rank holds the
same numbers and computes the same table with no extra collective), and moves each
layer's expert weights and their AdamW moments to the new slots with one all-to-all
(``MoELayer.set_placement``). No restart, no checkpoint round trip; placement changes
where experts compute, never what the model computes. It logs the predicted max/mean
rank load before and after, and the measured one of the window.

Every ``replica_check_every`` steps the expert replicas (the same logical expert in
several slots, and on the expert-data-parallel ranks) are verified bit-identical with one
all-gather of per-slot checksums over the DP group.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..distributed.collectives import comm_scope, guard
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from ..moe.placement import PlacementTable
from ..moe.planner import plan_placement
from ..moe.stats import MoEStats

StateFn = Callable[[MoELayer], Sequence[torch.Tensor]]
"""The engine's per-slot state of a layer's experts (e.g. AdamW moments), to move along."""


def max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 0.0


class Balancer:
    """Load window, re-placement and replica checks of one model (see the module docstring)."""

    def __init__(self, layers: dict[str, MoELayer], groups: ParallelGroups, every: int, window: int,
                 check_every: int, log: Callable[[str], None]) -> None:
        self.layers, self.groups, self.log = layers, groups, log
        self.every, self.check_every = every, check_every
        self.window: dict[str, deque] = {n: deque(maxlen=window or every or 1) for n in layers}
        self.slot_window: dict[str, deque] = {n: deque(maxlen=window or every or 1) for n in layers}
        self.history: list[dict] = []

    def observe(self, reduced: dict[str, MoEStats]) -> None:
        """One step's DP-reduced stats (device tensors; no sync here)."""
        if not self.every:
            return
        for name, stats in reduced.items():
            self.window[name].append(stats.kept_E.detach())
            self.slot_window[name].append(stats.kept_slots_P.detach())

    def maybe_rebalance(self, step: int, state: StateFn) -> Optional[dict]:
        """After optimizer step ``step`` (1-based): re-place when it is due. Collective."""
        if not self.every or step % self.every or not all(self.window.values()):
            return None
        record = {"step": step, "layers": {}}
        for name, layer in self.layers.items():
            load = torch.stack(list(self.window[name])).sum(0).to(torch.float64).tolist()
            slots = torch.stack(list(self.slot_window[name])).sum(0).tolist()
            old = layer.placement
            new = plan_placement(load, self.groups.ep_size, layer.config.num_slots,
                                 self.groups.ranks_per_node, layer.config.num_groups)
            measured = _rank_sums(slots, self.groups.ep_size)
            layer.set_placement(new, state=state(layer))
            record["layers"][name] = {
                "predicted_before": max_over_mean(old.rank_loads(load)),
                "predicted_after": max_over_mean(new.rank_loads(load)),
                "measured_before": max_over_mean(measured), "moved": new != old,
                "table": list(new.slot_to_expert)}
        for q in (*self.window.values(), *self.slot_window.values()):
            q.clear()
        self.history.append(record)
        self.log(f"rebalance at step {step}: " + ", ".join(
            f"{n} max/mean rank load {r['measured_before']:.3f} measured -> {r['predicted_after']:.3f} predicted"
            for n, r in record["layers"].items()))
        return record

    def maybe_check(self, step: int) -> None:
        """Every ``check_every`` steps: replicas bit-identical (collective over DP)."""
        if not self.check_every or step % self.check_every:
            return
        for name, layer in self.layers.items():
            check_replicas(layer, self.groups, f"step {step}: {name}")

    def tables(self) -> dict[str, dict]:
        return {n: layer.placement.to_json() for n, layer in self.layers.items()}

    def restore(self, tables: dict, log: Callable[[str], None]) -> None:
        """Re-place the layers as in a checkpoint written at the same EP size and slot
        count (before its weights are loaded; the weights load per logical expert)."""
        for name, layer in self.layers.items():
            saved = tables.get(name)
            if not saved:
                continue
            table = PlacementTable(tuple(saved["slot_to_expert"]), saved["num_experts"], saved["ep_size"])
            if table.ep_size == self.groups.ep_size and table.num_slots == layer.config.num_slots:
                layer.set_placement(table)
            else:
                log(f"{name}: checkpoint placement was for ep_size={table.ep_size}, {table.num_slots} slots; "
                    "starting from this run's initial table")


def _rank_sums(slots: Sequence[int], ep_size: int) -> list[float]:
    per = len(slots) // ep_size
    return [float(sum(slots[r * per : (r + 1) * per])) for r in range(ep_size)]


def slot_checksums(layer: MoELayer) -> torch.Tensor:
    """Exact per-slot fingerprint of this rank's expert weights: a position-weighted sum
    of their raw bits as int32 words (int64 arithmetic wraps alike everywhere)."""
    rows = []
    for p in layer.experts.parameters():
        flat = p.detach().reshape(p.shape[0], -1).contiguous()
        words = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.int16)
        rows.append(words.to(torch.int64))
    if not rows:
        return torch.zeros(0, dtype=torch.int64)
    raw = torch.cat(rows, dim=1)
    weights = torch.arange(raw.shape[1], dtype=torch.int64, device=raw.device) % 65521 + 1
    return (raw * weights).sum(1)


def check_replicas(layer: MoELayer, groups: ParallelGroups, where: str) -> None:
    """Every slot holding logical expert e, on every rank of the job, has the same bits:
    one all-gather over DP of ``[slots]`` checksums and ``[slots]`` expert ids; a mismatch
    raises the same ``RuntimeError`` on every rank."""
    sums = slot_checksums(layer)
    ids = torch.tensor(layer.experts.expert_ids, dtype=torch.int64, device=sums.device)
    mine = torch.stack([ids, sums])
    gathered = [mine]
    if groups.dp_group is not None:
        gathered = [torch.empty_like(mine) for _ in range(groups.world_size)]
        with comm_scope("trainer", "replica_check", "forward"), guard("all_gather"):
            dist.all_gather(gathered, mine, group=groups.dp_group)
    seen: dict[int, set] = {}
    for block in gathered:
        for e, c in zip(*block.tolist()):
            seen.setdefault(e, set()).add(c)
    bad = sorted(e for e, c in seen.items() if len(c) > 1)
    if bad:
        raise RuntimeError(f"{where}: replicas of experts {bad} diverged (checksums differ across slots/ranks)")


__all__ = ["Balancer", "check_replicas", "slot_checksums", "max_over_mean"]
