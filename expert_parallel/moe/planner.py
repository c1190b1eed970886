"""Placement planner: a balanced table of expert replicas from a measured load.

Legend: E logical experts, P slots, R EP ranks, s = P / R slots per rank, M nodes.

Our own planner after the idea of DeepSeek's EPLB (a hierarchical balanced packing):

1. *groups to nodes* (when the EP group spans M > 1 nodes and the experts form
   ``num_groups`` groups, a multiple of M): whole groups are packed onto nodes,
   heaviest first, so group-limited routing stays node-limited;
2. *replicate*: each extra slot goes to the expert with the largest load per replica
   (at most one replica per rank); this minimises the largest per-replica load;
3. *pack*: replicas, heaviest first, onto the least-loaded rank that has a free slot
   and no replica of that expert yet; then pairwise swaps between the most-loaded rank
   and the others while they lower the maximum.

Small instances (P <= 8 slots and at most 3 extra) are also solved exactly by
exhaustive search, and the best table found is returned; the identity layout (P = E) is
always among the candidates, so the plan is never worse than it. The objective is the
predicted maximum rank load, ``PlacementTable.rank_loads``: an expert's load splits
evenly over its replicas, as the round-robin routing rule makes it do.

Deterministic (stable orders, ties by id), so every rank computes the same table from
the same (DP-reduced) load with no extra collective.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

from .placement import PlacementTable

EXACT_MAX_SLOTS = 8
EXACT_MAX_EXTRA = 3


def replica_counts(load_E: Sequence[float], num_slots: int, max_per_expert: int) -> list[int]:
    """Give each of the ``P - E`` extra slots to the expert with the largest load per
    replica (ties: lowest id), at most ``max_per_expert`` replicas each."""
    n = [1] * len(load_E)
    for _ in range(num_slots - len(load_E)):
        candidates = [e for e in range(len(load_E)) if n[e] < max_per_expert]
        if not candidates:
            raise ValueError(f"placement: {num_slots} slots need more than {max_per_expert} replicas of "
                             f"some of the {len(load_E)} experts (replicas must be on distinct ranks)")
        best = max(candidates, key=lambda e: (load_E[e] / n[e], -e))
        n[best] += 1
    return n


def _pack(load_E: Sequence[float], counts: Sequence[int], ranks: Sequence[int],
          slots_per_rank: int) -> Optional[dict[int, list[int]]]:
    """Greedy LPT of replicas onto ``ranks`` then swap refinement; ``{rank: experts}``."""
    items = sorted(((load_E[e] / counts[e], e) for e in range(len(counts)) for _ in range(counts[e])),
                   key=lambda it: (-it[0], it[1]))
    held: dict[int, list[int]] = {r: [] for r in ranks}
    load = {r: 0.0 for r in ranks}
    for w, e in items:
        free = [r for r in ranks if len(held[r]) < slots_per_rank and e not in held[r]]
        if not free:
            return None
        r = min(free, key=lambda q: (load[q], q))
        held[r].append(e)
        load[r] += w
    per = {e: load_E[e] / counts[e] for e in range(len(counts))}
    improved = True
    while improved:
        improved = False
        top = max(ranks, key=lambda q: (load[q], -q))
        for other in ranks:
            if other == top:
                continue
            for a in list(held[top]):
                for b in list(held[other]):
                    if a == b or a in held[other] or b in held[top]:
                        continue
                    new_top, new_other = load[top] - per[a] + per[b], load[other] - per[b] + per[a]
                    if max(new_top, new_other) < load[top] - 1e-12:
                        held[top][held[top].index(a)] = b
                        held[other][held[other].index(b)] = a
                        load[top], load[other] = new_top, new_other
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
    return held


def _table(held: dict[int, list[int]], num_experts: int, ep_size: int) -> PlacementTable:
    slots: list[int] = []
    for r in range(ep_size):
        slots.extend(sorted(held[r]))
    return PlacementTable(tuple(slots), num_experts, ep_size)


def _exact(load_E: Sequence[float], num_slots: int, ep_size: int) -> Optional[PlacementTable]:
    """Exhaustive search over replica counts and assignments (small instances only)."""
    E, s = len(load_E), num_slots // ep_size
    best: Optional[tuple[float, PlacementTable]] = None
    for extra in itertools.combinations_with_replacement(range(E), num_slots - E):
        counts = [1 + extra.count(e) for e in range(E)]
        if max(counts) > ep_size:
            continue
        replicas = [e for e in range(E) for _ in range(counts[e])]
        per = [load_E[e] / counts[e] for e in range(E)]

        def search(i: int, held: list[list[int]], load: list[float]) -> None:
            nonlocal best
            if best is not None and max(load) >= best[0] - 1e-12:
                return
            if i == len(replicas):
                table = _table(dict(enumerate(held)), E, ep_size)
                best = (max(load), table)
                return
            e, seen = replicas[i], set()
            for r in range(ep_size):
                key = (tuple(sorted(held[r])), load[r])
                if len(held[r]) >= s or e in held[r] or key in seen:
                    continue
                seen.add(key)  # symmetric ranks: try one
                held[r].append(e)
                load[r] += per[e]
                search(i + 1, held, load)
                load[r] -= per[e]
                held[r].pop()

        search(0, [[] for _ in range(ep_size)], [0.0] * ep_size)
    return None if best is None else best[1]


def plan_placement(load_E: Sequence[float], ep_size: int, num_slots: int, ranks_per_node: int = 0,
                   num_groups: int = 1) -> PlacementTable:
    """A table of ``num_slots`` slots over ``ep_size`` ranks minimising the predicted
    maximum rank load for ``load_E`` (e.g. kept pairs per expert over a window)."""
    E = len(load_E)
    load = [max(0.0, float(x)) for x in load_E]
    if sum(load) == 0:
        load = [1.0] * E
    if num_slots % ep_size or num_slots < E:
        PlacementTable(tuple(range(E)) + (0,) * max(0, num_slots - E), E, ep_size)  # raises, named
    s = num_slots // ep_size
    candidates: list[PlacementTable] = []
    nodes = ep_size // ranks_per_node if ranks_per_node and ep_size % ranks_per_node == 0 else 1
    if nodes > 1 and num_groups % nodes == 0 and E % num_groups == 0:
        held = _pack_by_node(load, num_slots, ep_size, ranks_per_node, num_groups)
        if held is not None:
            candidates.append(_table(held, E, ep_size))
    held = _pack(load, replica_counts(load, num_slots, ep_size), list(range(ep_size)), s)
    if held is not None:
        candidates.append(_table(held, E, ep_size))
    if num_slots == E:
        candidates.append(PlacementTable.identity(E, ep_size))
    if num_slots <= EXACT_MAX_SLOTS and num_slots - E <= EXACT_MAX_EXTRA:
        exact = _exact(load, num_slots, ep_size)
        if exact is not None:
            candidates.append(exact)
    if not candidates:
        raise ValueError(f"placement: no table of {num_slots} slots over {ep_size} ranks holds "
                         f"{E} experts with replicas on distinct ranks")
    return min(candidates, key=lambda t: (round(max(t.rank_loads(load)), 9), t.slot_to_expert))


def _pack_by_node(load: list[float], num_slots: int, ep_size: int, per_node: int,
                  num_groups: int) -> Optional[dict[int, list[int]]]:
    """EPLB's first level: whole expert groups onto nodes, then replicate and pack inside
    each node over its share of the slots."""
    E, M = len(load), ep_size // per_node
    size = E // num_groups
    group_load = sorted(((sum(load[g * size : (g + 1) * size]), g) for g in range(num_groups)),
                        key=lambda it: (-it[0], it[1]))
    node_groups: dict[int, list[int]] = {m: [] for m in range(M)}
    node_load = [0.0] * M
    for w, g in group_load:
        m = min((m for m in range(M) if len(node_groups[m]) < num_groups // M), key=lambda q: (node_load[q], q))
        node_groups[m].append(g)
        node_load[m] += w
    held: dict[int, list[int]] = {}
    for m in range(M):
        experts = [e for g in sorted(node_groups[m]) for e in range(g * size, (g + 1) * size)]
        sub = [load[e] for e in experts]
        counts = replica_counts(sub, num_slots // M, per_node)
        ranks = list(range(m * per_node, (m + 1) * per_node))
        packed = _pack(sub, counts, ranks, num_slots // ep_size)
        if packed is None:
            return None
        for r, local in packed.items():
            held[r] = [experts[i] for i in local]
    return held


__all__ = ["plan_placement", "replica_counts"]
