"""Expert placement: which logical expert each physical slot of the EP group computes.

Legend: E logical experts, P physical slots (``P = E + num_redundant_experts``), R EP
ranks, s = P / R slots per rank, T tokens, K choices.

A :class:`PlacementTable` lists the logical expert of every slot; rank r holds slots
``[r*s, (r+1)*s)``, in that order, as its stacked expert parameters. A logical expert
may have several replicas (on distinct ranks); a rank may hold any experts. The
identity table (P = E, slot i = expert i) is the contiguous layout every dispatcher
was written for, and with it nothing changes.

Routing to replicas (:func:`slots_for_pairs`, pure index math like ``permute.py``): the
capacity decision stays per *logical* expert, then each kept (token, expert) pair is
sent to one replica, chosen by its position among this rank's kept pairs of that
expert, round robin: position j -> replica ``j mod n_e``. Each source rank spreads its
pairs evenly, so the compute moves and nothing else does: outputs, aux loss and the
per-expert stats equal the unreplicated layer's. The dispatchers then see slot ids in
place of expert ids (``num_experts = P``).

Data path with a table::

    router -> capacity (per logical expert) -> slots_for_pairs -> dispatch over P slots
    -> experts (this rank's s slots) -> combine
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from .permute import count_ids


@dataclass(frozen=True)
class PlacementTable:
    """The logical expert of every physical slot; validated on construction."""

    slot_to_expert: tuple[int, ...]
    num_experts: int
    ep_size: int

    def __post_init__(self) -> None:
        P, E, R = len(self.slot_to_expert), self.num_experts, self.ep_size
        if P % R:
            if P == E:
                raise ValueError(f"num_experts={E} must be divisible by ep_size={R}")
            raise ValueError(f"placement: {P} slots do not divide over ep_size={R} ranks "
                             f"(num_experts={E} + num_redundant_experts={P - E} must be a multiple of {R})")
        if P < E:
            raise ValueError(f"placement: {P} slots cannot hold num_experts={E} experts")
        bad = [g for g in self.slot_to_expert if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < E]
        if bad:
            raise ValueError(f"placement: slot entries must be expert ids in [0, {E}), got {bad[:4]}")
        missing = sorted(set(range(E)) - set(self.slot_to_expert))
        if missing:
            raise ValueError(f"placement: experts {missing} have no slot (every expert needs >= 1)")
        s = P // R
        for r in range(R):
            ids = self.slot_to_expert[r * s : (r + 1) * s]
            if len(set(ids)) != len(ids):
                raise ValueError(f"placement: rank {r} holds expert(s) "
                                 f"{sorted({g for g in ids if ids.count(g) > 1})} twice; replicas must "
                                 "be on distinct ranks")

    @staticmethod
    def identity(num_experts: int, ep_size: int) -> "PlacementTable":
        return PlacementTable(tuple(range(num_experts)), num_experts, ep_size)

    @property
    def num_slots(self) -> int:
        return len(self.slot_to_expert)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    @property
    def is_identity(self) -> bool:
        return self.slot_to_expert == tuple(range(self.num_experts))

    def local_experts(self, ep_rank: int) -> list[int]:
        s = self.slots_per_rank
        return list(self.slot_to_expert[ep_rank * s : (ep_rank + 1) * s])

    def replicas(self, expert: int) -> list[int]:
        """Slots of ``expert``, ascending."""
        return [p for p, g in enumerate(self.slot_to_expert) if g == expert]

    def replica_counts(self) -> list[int]:
        counts = [0] * self.num_experts
        for g in self.slot_to_expert:
            counts[g] += 1
        return counts

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def rank_loads(self, load_E: Sequence[float]) -> list[float]:
        """Predicted load of each rank when every expert's load splits evenly over its
        replicas (what the round-robin rule gives per source rank)."""
        n = self.replica_counts()
        out = [0.0] * self.ep_size
        for p, g in enumerate(self.slot_to_expert):
            out[self.rank_of_slot(p)] += load_E[g] / n[g]
        return out

    def fingerprint(self) -> str:
        blob = json.dumps([self.num_experts, self.ep_size, list(self.slot_to_expert)]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "ep_size": self.ep_size,
                "slot_to_expert": list(self.slot_to_expert)}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(replica_count_E, replica_slot_EN)`` on ``device``: each expert's replica
        count and its slots padded to the largest count (for :func:`slots_for_pairs`)."""
        n = self.replica_counts()
        width = max(n)
        table = [[0] * width for _ in range(self.num_experts)]
        for g in range(self.num_experts):
            slots = self.replicas(g)
            table[g] = slots + [slots[0]] * (width - len(slots))
        return (torch.tensor(n, dtype=torch.long, device=device),
                torch.tensor(table, dtype=torch.long, device=device))


def slots_for_pairs(topk_idx_TK: torch.Tensor, kept_TK: torch.Tensor, replica_count_E: torch.Tensor,
                    replica_slot_EN: torch.Tensor) -> torch.Tensor:
    """Physical slot of every (token, choice) pair: the kept pairs of expert e, in token
    order, take e's replicas round robin. Dropped pairs keep slot ``replica_slot[e, 0]``
    (they are never sent). No host sync."""
    num_tokens, k = topk_idx_TK.shape
    num_experts = replica_count_E.numel()
    key_P = torch.where(kept_TK, topk_idx_TK, torch.full_like(topk_idx_TK, num_experts)).reshape(-1)
    order_P = torch.sort(key_P, stable=True).indices
    counts = count_ids(key_P, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_key = key_P[order_P]
    position_sorted = torch.arange(key_P.numel(), device=key_P.device) - starts[sorted_key]
    position_P = torch.empty_like(position_sorted)
    position_P[order_P] = position_sorted
    expert_P = topk_idx_TK.reshape(-1)
    replica_P = torch.where(key_P < num_experts, position_P % replica_count_E[expert_P], 0)
    return replica_slot_EN[expert_P, replica_P].view(num_tokens, k)


__all__ = ["PlacementTable", "slots_for_pairs"]
