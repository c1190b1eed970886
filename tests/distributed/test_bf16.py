"""bf16 autocast through every dispatch mode follows the fp32 run, at EP=2 and EP=4.

For each layout of the golden check's table (``test_ep_equivalence.LAYOUTS``: flat,
hierarchical, overlapped and static-shape dispatch at EP=2, EP=4 and EP=2 x DP=2) and the
all-gather dispatcher at EP=2 and EP=4, real
gloo ranks run each scenario twice on the same weights and batch: in fp32, and under
``torch.autocast("cpu", dtype=torch.bfloat16)``. The bf16 rules (docs/PRECISION.md):

* the router runs in fp32, so routing, capacity and every count are *exactly* equal;
* the dispatch and combine all-to-alls move bf16 rows: exactly half the fp32 bytes (the
  all-gather dispatcher's dispatch sends rows and fp32 routing as one fp32 message: the
  fp32 run's bytes);
* output, input gradient and router/expert gradients agree with fp32 within
  ``REL_TOL`` = 3% of the largest fp32 magnitude of that tensor (bf16 keeps 8
  significant bits: one rounding is <= 2**-9 = 0.2%; the expert MLP rounds its inputs,
  its hidden activations and its output, and gradients go through the same GEMMs).
  Measured over all layouts and scenarios: at most 1.8% (output), 1.1% (input grad),
  1.6% (router grad), 1.5% (expert grads);
* the aux loss is computed from fp32 logits: within 1e-6;
* master weights and their gradients stay fp32.
"""

from __future__ import annotations

import functools

import pytest
import torch

from expert_parallel import ParallelGroups
from expert_parallel.profiling.timer import PhaseTimer
from tests.distributed import scenarios as sc
from tests.distributed.test_ep_equivalence import LAYOUTS, _scenarios
from tests.harness import run_ranks

REL_TOL = 3e-2
"""bf16 vs fp32: max abs difference / max abs fp32 value, per tensor."""

EXCHANGES = ("dispatch_a2a", "combine_a2a")

# The all-gather dispatcher (small token counts) is not in the golden table's layouts (the
# dispatcher matrix pins it against EP=1); every scenario here holds <= 24 tokens per rank,
# under its default cap, so it really runs. Its dispatch exchange also carries a side
# message (token index, weight) that stays fp32: only its rows halve.
EXTRA_LAYOUTS = {
    "ep2_allgather": (2, 2, {}, {"a2a_algorithm": "allgather"}),
    "ep4_allgather": (4, 4, {}, {"a2a_algorithm": "allgather"}),
}
ALL_LAYOUTS = {**LAYOUTS, **EXTRA_LAYOUTS}


def _one_run(name: str, groups: ParallelGroups, overrides: dict, rank: int, bf16: bool) -> dict:
    layer = sc.build_layer(name, groups, **overrides)
    timer = PhaseTimer("cpu")
    layer.set_timer(timer)
    x, cot = sc.batch(name, rank)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        step = sc.run_step(layer, x, cot)
    step["bytes"] = {p: timer.bytes_sent[p] + timer.bytes_received[p] for p in EXCHANGES}
    step["param_dtypes"] = sorted({str(p.dtype) for p in layer.parameters()})
    step["grad_dtypes"] = sorted({str(g.dtype) for g in step["grads"].values()})
    step["output_dtype"] = str(step["output"].dtype)
    return step


def _worker(rank: int, world: int, ep_size: int, group_kwargs: dict, overrides: dict) -> dict:
    groups = ParallelGroups.build(ep_size, **group_kwargs)
    names = sc.static_shape_scenarios() if overrides.get("static_shapes") else list(sc.SCENARIOS)
    return {name: {"fp32": _one_run(name, groups, overrides, rank, False),
                   "bf16": _one_run(name, groups, overrides, rank, True)} for name in names}


@functools.lru_cache(maxsize=None)
def results(layout: str) -> list[dict]:
    world, ep, group_kwargs, overrides = ALL_LAYOUTS[layout]
    return run_ranks(_worker, world, ep, group_kwargs, overrides, timeout=240)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.numel():
        return 0.0
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


CASES = [(layout, name) for layout in LAYOUTS for name in _scenarios(layout)]
CASES += [(layout, name) for layout in EXTRA_LAYOUTS for name in sc.SCENARIOS]


@pytest.mark.parametrize("layout,name", CASES)
def test_bf16_follows_fp32(layout: str, name: str) -> None:
    for rank, res in enumerate(results(layout)):
        ref, got = res[name]["fp32"], res[name]["bf16"]
        tag = f"{layout}/{name}/rank{rank}"
        # Routing ran in fp32: identical decisions and counts.
        sc.assert_stats_equal(got["stats"], ref["stats"], tag)
        assert abs(got["aux_loss"].item() - ref["aux_loss"].item()) <= 1e-6, tag
        # The input was fp32, so the output is fp32; weights and grads stay fp32.
        assert got["output_dtype"] == "torch.float32", tag
        assert got["param_dtypes"] == ["torch.float32"] and got["grad_dtypes"] == ["torch.float32"], tag
        pairs = [("output", got["output"], ref["output"]), ("input grad", got["x_grad"], ref["x_grad"])]
        pairs += [(f"grad {n}", got["grads"][n], ref["grads"][n]) for n in ref["grads"]]
        for what, a, b in pairs:
            err = _rel_err(a, b)
            assert err <= REL_TOL, f"{tag} {what}: bf16 vs fp32 relative error {err:.3e} > {REL_TOL}"
        # The exchanges moved bf16 rows: exactly half the bytes (all-gather: its combine
        # exactly half; its dispatch is ONE message of rows and fp32 routing side by side, in
        # fp32, so the same bytes as the fp32 run -- a fallback to the flat exchange would
        # move exactly half, so this also proves the all-gather path ran).
        allgather = layout in EXTRA_LAYOUTS
        for phase in EXCHANGES:
            if allgather and phase == "dispatch_a2a":
                assert got["bytes"][phase] == ref["bytes"][phase], (tag, phase, got["bytes"], ref["bytes"])
            else:
                assert 2 * got["bytes"][phase] == ref["bytes"][phase], (tag, phase, got["bytes"], ref["bytes"])
            assert ref["bytes"][phase] > 0, (tag, phase)
