"""Placement planner and table: brute-force optimum on small cases, never worse than
identity, deterministic, and named errors for bad tables."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expert_parallel.moe.placement import PlacementTable, slots_for_pairs
from expert_parallel.moe.planner import plan_placement


def brute_force(load: list[float], ep: int, slots: int) -> float:
    """Smallest max rank load over every table (every assignment of experts to slots)."""
    E, best = len(load), float("inf")
    for assign in itertools.product(range(E), repeat=slots):
        try:
            table = PlacementTable(assign, E, ep)
        except ValueError:
            continue
        best = min(best, max(table.rank_loads(load)))
    return best


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=st.sampled_from([(3, 3, 3), (4, 2, 4), (4, 2, 6), (3, 2, 4), (4, 4, 4), (5, 2, 6)]),
       data=st.data())
def test_planner_matches_brute_force_on_small_cases(case, data) -> None:
    E, ep, slots = case
    load = data.draw(st.lists(st.integers(0, 50), min_size=E, max_size=E)).copy()
    load = [float(x) for x in load]
    if sum(load) == 0:
        load[0] = 1.0
    table = plan_placement(load, ep, slots)
    assert abs(max(table.rank_loads(load)) - brute_force(load, ep, slots)) <= 1e-9


@settings(max_examples=40, deadline=None, derandomize=True)
@given(E=st.sampled_from([8, 16, 32]), ep=st.sampled_from([2, 4, 8]), extra_per_rank=st.integers(0, 2),
       exponent=st.floats(0.0, 2.0), seed=st.integers(0, 1000))
def test_planner_is_never_worse_than_identity(E, ep, extra_per_rank, exponent, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    load = (1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** exponent)[torch.randperm(E, generator=gen)]
    load = load.tolist()
    identity = max(PlacementTable.identity(E, ep).rank_loads(load))
    table = plan_placement(load, ep, E + extra_per_rank * ep)
    assert max(table.rank_loads(load)) <= identity + 1e-9
    assert table == plan_placement(load, ep, E + extra_per_rank * ep)  # deterministic


def test_zipf_balance_with_one_redundant_slot_per_rank() -> None:
    load = (1.0 / torch.arange(1, 17, dtype=torch.float64) ** 1.2).tolist()
    before = PlacementTable.identity(16, 4).rank_loads(load)
    after = plan_placement(load, 4, 20).rank_loads(load)
    mean = sum(load) / 4
    assert max(before) / mean > 1.5 and max(after) / mean <= 1.10


def test_round_robin_spreads_each_experts_pairs_over_its_replicas() -> None:
    table = PlacementTable((0, 1, 2, 0, 3, 1), 4, 2)
    n, slots = table.tensors(torch.device("cpu"))
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [0, 1]])
    kept = torch.ones_like(idx, dtype=torch.bool)
    kept[4, 0] = False  # a dropped pair takes no replica's turn
    got = slots_for_pairs(idx, kept, n, slots)
    # Expert 0's kept pairs in token order (t0, t1, t2, t3) alternate slots 0 and 3.
    assert [int(got[t, c]) for t, c in ((0, 0), (1, 0), (2, 0), (3, 1))] == [0, 3, 0, 3]
    # Expert 1 (t0, t2, t4) alternates slots 1 and 5; expert 3 -> slot 4; expert 2 -> 2.
    assert [int(got[0, 1]), int(got[2, 1]), int(got[4, 1])] == [1, 5, 1]
    assert int(got[3, 0]) == 4 and int(got[1, 1]) == 2


BAD = [
    ((0, 1, 2), 4, 2, "placement: 3 slots do not divide over ep_size=2 ranks"),
    ((0, 1, 2, 2), 4, 2, "placement: experts [3] have no slot"),
    ((0, 0, 1, 2, 3, 1), 4, 2, "placement: rank 0 holds expert(s) [0] twice"),
    ((0, 1, 2, 9), 4, 2, "placement: slot entries must be expert ids in [0, 4), got [9]"),
    ((0, 1, 2), 4, 1, "placement: 3 slots cannot hold num_experts=4 experts"),
]


@pytest.mark.parametrize("slots,E,ep,message", BAD)
def test_bad_tables_are_named(slots, E, ep, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PlacementTable(slots, E, ep)


def test_layer_refuses_redundancy_without_expert_parallelism() -> None:
    from expert_parallel import MoEConfig, MoELayer

    with pytest.raises(ValueError, match=re.escape("num_redundant_experts=2 needs ep_size >= 2")):
        MoELayer(MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, num_redundant_experts=2))
