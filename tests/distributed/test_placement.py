"""Expert placement tables (``moe/placement.py``): any table computes the same function.

Random tables (random permutations, 0-4 redundant slots, replicas on random distinct
ranks) at EP=4 and EP=2 x expert-DP 2, in the flat, hierarchical, overlapped and static
modes, on real gloo ranks. Per rank: forward, aux loss, input and router gradients and
the per-expert stats equal the EP=1 reference without any table; after
``sync_replica_grads`` every slot's gradient equals its logical expert's full gradient
(the sum of the reference gradients over the EP group), so replicas step identically.
Then a live re-placement (``set_placement``) to another table, weights and a fake
optimizer moment moved by one all-to-all, and the next forward still equals the
reference. Ranks that pass different tables all raise the same named error.
"""

from __future__ import annotations

import functools
import random
from typing import Optional

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.moe.placement import PlacementTable
from tests.distributed import scenarios as sc
from tests.harness import run_ranks

D, F, E = 8, 12, 8
MODES = {
    "ep4_flat": (4, 4, {}, {}),
    "ep4_hierarchical": (4, 4, {"ranks_per_node": 2}, {"a2a_algorithm": "hierarchical"}),
    "ep2xdp2_overlap": (4, 2, {}, {"overlap_chunks": 2}),
    "ep4_static": (4, 4, {}, {"static_shapes": True, "nonfinite_policy": "count"}),
}


def random_table(rng: random.Random, ep: int, extra: int) -> PlacementTable:
    s = (E + extra) // ep
    while True:
        slots = list(range(E)) + [rng.randrange(E) for _ in range(extra)]
        rng.shuffle(slots)
        per_rank = [slots[r * s : (r + 1) * s] for r in range(ep)]
        if all(len(set(p)) == len(p) for p in per_rank):
            return PlacementTable(tuple(slots), E, ep)


def tables(ep: int) -> list[PlacementTable]:
    rng = random.Random(1234 + ep)
    extras = [0, ep, 0, ep, 2 * ep] if ep == 2 else [0, 4, 4, 4, 0, 4]
    return [random_table(rng, ep, x) for x in extras]


def config(table: Optional[PlacementTable], overrides: dict, cap: bool) -> MoEConfig:
    extra = 0 if table is None else table.num_slots - E
    kw = dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2, num_redundant_experts=extra,
              aux_loss_coeff=0.01, min_capacity=1)
    if cap or overrides.get("static_shapes"):
        kw.update(capacity_factor=1.0, eval_capacity_factor=1.0)
    return MoEConfig(**kw, **overrides)


def batch(rank: int, i: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = 12 if static else [13, 7, 20, 9][rank]
    gen = torch.Generator().manual_seed(31 * i + rank)
    return torch.randn(t, D, generator=gen) * 3, torch.randn(t, D, generator=gen)


def build(table: Optional[PlacementTable], overrides: dict, cap: bool, groups) -> MoELayer:
    layer = MoELayer(config(table, overrides, cap), groups, seed=21, name="placed")
    if table is not None:
        layer.set_placement(table)
    return layer


def _worker(rank: int, world: int, mode: str) -> dict:
    _, ep, group_kwargs, overrides = MODES[mode]
    groups = ParallelGroups.build(ep, **group_kwargs)
    static = bool(overrides.get("static_shapes"))
    out = {}
    tabs = tables(ep)
    for i, table in enumerate(tabs):
        cap = i % 2 == 1
        layer = build(table, overrides, cap, groups)
        res = sc.run_step(layer, *batch(rank, i, static))
        layer.sync_replica_grads()
        res["synced"] = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
        res["ep_ranks"] = list(groups.ep_ranks)
        res["kept_slots"] = res["stats"].kept_slots_P
        # Live re-placement to the next table (same slot count), with a per-slot moment.
        nxt = next((t for t in tabs[i + 1:] + tabs[:i] if t.num_slots == table.num_slots and t != table), None)
        if nxt is not None:
            moment = layer.experts.w1_eDF.detach().clone() * 2 + 1
            layer.set_placement(nxt, state=[moment])
            res["after"] = sc.run_step(layer, *batch(rank, i, static))
            res["moment_ok"] = bool(torch.equal(moment, layer.experts.w1_eDF.detach() * 2 + 1))
            res["after_ids"] = list(layer.experts.expert_ids)
        out[i] = res
    # Ranks disagreeing on a table: every rank raises the same named error.
    layer = build(tabs[1], overrides, False, groups)
    other = next(t for t in tabs[2:] if t.num_slots == tabs[1].num_slots and t != tabs[1])
    try:
        layer.set_placement(tabs[1] if rank == 0 else other)
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    return out


@functools.lru_cache(maxsize=None)
def results(mode: str) -> list[dict]:
    return run_ranks(_worker, MODES[mode][0], mode, timeout=400)


@functools.lru_cache(maxsize=None)
def reference(mode: str, i: int, rank: int) -> dict:
    overrides = {k: v for k, v in MODES[mode][3].items() if k in ("static_shapes", "nonfinite_policy")}
    layer = build(None, overrides, i % 2 == 1, None)
    return sc.run_step(layer, *batch(rank, i, "static_shapes" in overrides))


CASES = [(m, i) for m in MODES for i in range(len(tables(MODES[m][1])))]


@pytest.mark.parametrize("mode,i", CASES)
def test_any_table_equals_the_reference(mode: str, i: int) -> None:
    for rank, res in enumerate(results(mode)):
        got, ref = res[i], reference(mode, i, rank)
        tag = f"{mode}/table{i}/rank{rank}"
        for key in ("output", "aux_loss", "x_grad"):
            sc.assert_close(got[key], ref[key], f"{tag} {key}")
        sc.assert_close(got["grads"]["router.weight"], ref["grads"]["router.weight"], f"{tag} router grad")
        sc.assert_stats_equal(got["stats"], ref["stats"], tag)
        # Every slot (replica or not) holds its logical expert's full gradient after sync.
        for pname, grad in got["synced"].items():
            key = f"experts.{pname}"
            for j, e in enumerate(got["expert_ids"]):
                want = sum(reference(mode, i, r)["grads"][key][e] for r in got["ep_ranks"])
                sc.assert_close(grad[j], want, f"{tag} synced grad {pname} slot {j} (expert {e})")
        if "after" in got:
            assert got["moment_ok"], f"{tag}: optimizer state did not follow its expert"
            for key in ("output", "aux_loss", "x_grad"):
                sc.assert_close(got["after"][key], ref[key], f"{tag} after re-placement {key}")


def test_replicas_take_their_share_of_the_load() -> None:
    """Not vacuous: with a table that replicates, the replicas receive pairs, and the
    per-slot loads add up to the per-expert loads."""
    res = results("ep4_flat")
    table = tables(4)[1]
    assert table.num_slots > E
    kept = sum(r[1]["kept_slots"] for r in res)
    per_expert = sum(r[1]["stats"].kept_E for r in res)
    for e in range(E):
        slots = table.replicas(e)
        assert int(kept[slots].sum()) == int(per_expert[e])
        if len(slots) > 1 and int(per_expert[e]) >= 2 * len(slots):
            assert all(int(kept[p]) > 0 for p in slots), (e, slots, kept[slots])


@pytest.mark.parametrize("mode", ["ep4_flat"])
def test_ranks_with_different_tables_raise_the_same_named_error(mode: str) -> None:
    messages = [r["mismatch"] for r in results(mode)]
    assert all(m is not None and "ranks disagree" in m and "placement" in m for m in messages), messages
