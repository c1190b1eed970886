"""Golden check: EP = N equals the single-process EP = 1 reference.

For each layout (EP=2 on 2 ranks, EP=4 on 4 ranks, EP=2 x expert-DP=2 on 4 ranks), real
gloo processes run every scenario of ``scenarios.py``; the parent process runs an EP=1
layer on each rank's batch. Outputs, aux losses, stats, input gradients and router
gradients must match per rank; each expert's gradient on its owner must equal the sum of
the reference gradients over the ranks of the owner's EP group (those are exactly the
tokens it served). fp32, max abs diff <= 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch

from expert_parallel import ParallelGroups
from expert_parallel.moe.stats import MoEStats
from tests.distributed import scenarios as sc
from tests.harness import run_ranks

# name -> (world size, ep size, ParallelGroups.build kwargs, config overrides)
LAYOUTS = {
    "ep2": (2, 2, {}, {}),
    "ep4": (4, 4, {}, {}),
    "ep2xdp2": (4, 2, {}, {}),
    # Two emulated "nodes" of 2 ranks: across nodes once per (token, node), then inside.
    "ep4_hierarchical": (4, 4, {"ranks_per_node": 2}, {"a2a_algorithm": "hierarchical"}),
    # Four one-rank "nodes" (the intra-node hop is a self-exchange) next to expert-DP.
    "ep2xdp2_hierarchical_l1": (4, 2, {"ranks_per_node": 1}, {"a2a_algorithm": "hierarchical"}),
    # Chunks pipelined through async all-to-alls (compute/communication overlap).
    "ep2_overlap3": (2, 2, {}, {"overlap_chunks": 3}),
    "ep2xdp2_overlap2": (4, 2, {}, {"overlap_chunks": 2}),
    # Fixed-capacity padded dispatch: static shapes, no host sync.
    "ep4_static": (4, 4, {}, {"static_shapes": True}),
    "ep2xdp2_static": (4, 2, {}, {"static_shapes": True}),
}


def _scenarios(layout: str) -> list[str]:
    if LAYOUTS[layout][3].get("static_shapes"):
        return sc.static_shape_scenarios()
    return list(sc.SCENARIOS)


def _worker(rank: int, world: int, ep_size: int, group_kwargs: dict, overrides: dict) -> dict:
    groups = ParallelGroups.build(ep_size, **group_kwargs)
    results = {}
    static = bool(overrides.get("static_shapes"))
    names = sc.static_shape_scenarios() if static else list(sc.SCENARIOS)
    for name in names:
        layer = sc.build_layer(name, groups, **overrides)
        x, cot = sc.batch(name, rank)
        step = sc.run_step(layer, x, cot)
        step["reduced"] = step["stats"].reduce(groups.dp_group)
        step["global_sd"] = layer.global_state_dict()
        step["ep_ranks"] = list(groups.ep_ranks)
        results[name] = step
    return results


@functools.lru_cache(maxsize=None)
def distributed_results(layout: str) -> list[dict]:
    world, ep, group_kwargs, overrides = LAYOUTS[layout]
    return run_ranks(_worker, world, ep, group_kwargs, overrides, timeout=240)


@functools.lru_cache(maxsize=None)
def reference(name: str, rank: int) -> dict:
    layer = sc.build_layer(name, None)
    x, cot = sc.batch(name, rank)
    step = sc.run_step(layer, x, cot)
    step["global_sd"] = layer.global_state_dict()
    return step


_close = sc.assert_close
_stats_equal = sc.assert_stats_equal


CASES = [(layout, name) for layout in LAYOUTS for name in _scenarios(layout)]


@pytest.mark.parametrize("layout,name", CASES)
def test_ep_matches_single_process_reference(layout: str, name: str) -> None:
    results = distributed_results(layout)
    world = len(results)
    for rank, res in enumerate(results):
        got, ref = res[name], reference(name, rank)
        tag = f"{layout}/{name}/rank{rank}"
        _close(got["output"], ref["output"], f"{tag} output")
        _close(got["aux_loss"], ref["aux_loss"], f"{tag} aux_loss")
        _close(got["x_grad"], ref["x_grad"], f"{tag} input grad")
        _stats_equal(got["stats"], ref["stats"], tag)
        for pname in ("router.weight",):
            _close(got["grads"][pname], ref["grads"][pname], f"{tag} grad {pname}")
        # Expert grads: owner's grad = sum over its EP group's ranks of reference grads.
        ids = got["expert_ids"]
        for pname, grad in got["grads"].items():
            if not pname.startswith("experts."):
                continue
            want = sum(reference(name, r)["grads"][pname][ids[0] : ids[-1] + 1]
                       for r in res[name]["ep_ranks"])
            _close(grad, want, f"{tag} grad {pname}")
    # Stats reduced over all ranks equal the sum of the per-rank references.
    want_total = MoEStats.accumulate([reference(name, r)["stats"] for r in range(world)])
    for res in results:
        _stats_equal(res[name]["reduced"], want_total, f"{layout}/{name} reduced")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_global_state_dict_independent_of_ep_size(layout: str) -> None:
    for name in _scenarios(layout):
        want = reference(name, 0)["global_sd"]
        for rank, res in enumerate(distributed_results(layout)):
            got = res[name]["global_sd"]
            assert set(got) == set(want)
            for key in want:
                assert torch.equal(got[key], want[key]), f"{layout}/{name}/rank{rank}: {key}"
