"""Moving experts between slots, and keeping replicas identical (collectives).

Legend: s slots per rank, R EP ranks, W row width (the flattened per-slot state).

* :func:`move_slots` re-places expert rows for a new :class:`~.placement.PlacementTable`:
  every stacked ``[s, ...]`` tensor (weights, and their optimizer state) is flattened to
  rows, each new slot fetches its expert's row from one holder in the old table (the
  replica ``q mod n_old`` for new slot q, spreading the sends), and ONE all-to-all over
  the EP group moves them. Every rank derives every split from the two tables, so there
  is no count exchange and no host sync. No restart, no checkpoint round trip.
* :func:`sync_replica_grads` sums the gradients of the replicas of each replicated
  expert over the EP group (one all-reduce of only those experts' rows), after the
  expert-data-parallel reduction: every replica then holds the full gradient, steps
  identically and stays identical.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..distributed.collectives import CALL_COUNTS, all_to_all_rows, comm_scope, guard
from .placement import PlacementTable


def move_plan(old: PlacementTable, new: PlacementTable, me: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(send_local_slots, input_splits, output_splits, recv_order)`` for rank ``me``:
    the old local slots to send, grouped by destination rank (in the destination's new
    slot order); how many go to / come from each rank; and, for the rows as they arrive
    (source-rank-major), the new local slot each one fills."""
    R, s = new.ep_size, new.slots_per_rank
    s_old = old.slots_per_rank

    def source(q: int) -> tuple[int, int]:
        holders = old.replicas(new.slot_to_expert[q])
        # Prefer a holder on the destination rank itself (a local copy), else spread.
        local = [p for p in holders if p // s_old == q // s]
        p = local[0] if local else holders[q % len(holders)]
        return p // s_old, p % s_old

    plan = [source(q) for q in range(new.num_slots)]  # (src rank, src local slot) per new slot
    send, input_splits = [], []
    for d in range(R):
        rows = [loc for q in range(d * s, (d + 1) * s) for (src, loc) in [plan[q]] if src == me]
        send += rows
        input_splits.append(len(rows))
    output_splits, recv_order = [], []
    for src in range(R):
        mine = [q - me * s for q in range(me * s, (me + 1) * s) if plan[q][0] == src]
        output_splits.append(len(mine))
        recv_order += mine
    return send, input_splits, output_splits, recv_order


@torch.no_grad()
def move_slots(tensors: Sequence[torch.Tensor], old: PlacementTable, new: PlacementTable,
               me: int, group: Any) -> None:
    """Re-place the rows of every stacked ``[s, ...]`` tensor in place (collective over
    the EP ``group``; ``group=None`` for one rank)."""
    if not tensors:
        return
    if old.slots_per_rank != new.slots_per_rank:
        raise ValueError(f"placement: slots per rank must not change ({old.slots_per_rank} -> "
                         f"{new.slots_per_rank})")
    s = new.slots_per_rank
    send, input_splits, output_splits, recv_order = move_plan(old, new, me)
    dtypes = {t.dtype for t in tensors}
    common = dtypes.pop() if len(dtypes) == 1 else torch.float64  # exact for fp32/bf16 rows
    flat = torch.cat([t.reshape(s, -1).to(common) for t in tensors], dim=1)
    rows = flat.index_select(0, torch.tensor(send, dtype=torch.long, device=flat.device))
    with comm_scope(phase="replace_experts"):
        got = all_to_all_rows(rows, output_splits, input_splits, group)
    moved = torch.empty_like(flat)
    moved[torch.tensor(recv_order, dtype=torch.long, device=flat.device)] = got
    offset = 0
    for t in tensors:
        width = t[0].numel() if s else 0
        t.copy_(moved[:, offset : offset + width].reshape(t.shape).to(t.dtype))
        offset += width


def replicated_experts(table: PlacementTable) -> list[int]:
    return [e for e, n in enumerate(table.replica_counts()) if n > 1]


@torch.no_grad()
def sync_replica_grads(grads: Sequence[torch.Tensor], table: PlacementTable, me: int, group: Any) -> None:
    """Sum the gradients of each replicated expert over its replicas (collective over
    the EP ``group``): one all-reduce of a ``[H, W]`` buffer, H the replicated experts."""
    hot = replicated_experts(table)
    if not hot or group is None or not grads:
        return
    s = table.slots_per_rank
    local = table.local_experts(me)
    row = {e: i for i, e in enumerate(hot)}
    flat = torch.cat([g.reshape(s, -1) for g in grads], dim=1)
    buf = flat.new_zeros(len(hot), flat.shape[1])
    mine = [(j, row[e]) for j, e in enumerate(local) if e in row]
    if mine:
        idx_local = torch.tensor([j for j, _ in mine], device=flat.device)
        idx_hot = torch.tensor([h for _, h in mine], device=flat.device)
        buf.index_add_(0, idx_hot, flat.index_select(0, idx_local))
    CALL_COUNTS["all_reduce_replicas"] += 1
    with comm_scope(phase="replica_grad_sync"), guard("all_reduce"):
        dist.all_reduce(buf, group=group)
    if mine:
        flat[idx_local] = buf.index_select(0, idx_hot)
        offset = 0
        for g in grads:
            width = g[0].numel()
            g.copy_(flat[:, offset : offset + width].reshape(g.shape))
            offset += width


__all__ = ["move_slots", "move_plan", "sync_replica_grads", "replicated_experts"]
