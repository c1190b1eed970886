"""Property-based golden check: EP=2 and EP=4 equal the EP=1 reference on random cases.

Hypothesis draws over the whole dispatcher matrix: the model dims, the number of
experts, top-k, every router (with its own parameters: top-p mass, a selection bias,
a noise map), the expert backend, the dispatch mode (flat, overlap with 2-4 chunks,
static shapes, the padded all-gather (with its fallback); at EP=4 also the hierarchical
exchange over two emulated 2-rank nodes, alone and pipelined), a random placement table
(experts shuffled over the ranks, 0-2 replicas per rank; replica gradients summed before
the comparison), the capacity factor (or dropless), the drop policy, the tokens on
every rank (often 0: empty ranks) and a routing skew (everything to one expert, no token
for one rank's experts, every token to one rank's experts). The EP ranks are real gloo processes: the harness's
live rank pool, fed one example at a time (spawning per example would cost seconds);
the parent runs the EP=1 reference on each rank's batch. Outputs, aux loss,
stats, input and router gradients must match per rank, and each expert's gradient the
sum of the reference gradients over all ranks (as in ``test_ep_equivalence.py``).

CI runs a bounded, derandomized number of examples per EP size. The long run::

    MOE_PROPERTY_EXAMPLES=200 python -m pytest tests/distributed/test_property_equivalence.py

runs 200 random examples per EP size (the variable is read by this test only).
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.moe.placement import PlacementTable
from tests.distributed.scenarios import run_step
from tests.harness import run_ranks

EXAMPLES = int(os.environ.get("MOE_PROPERTY_EXAMPLES", "10"))
LONG_RUN = "MOE_PROPERTY_EXAMPLES" in os.environ
ATOL, RTOL = 1e-5, 1e-4
EXAMPLE_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- examples
ROUTERS = ["softmax_topk", "switch", "sigmoid_topk", "noisy_topk", "top_p", "expert_choice"]
MODES = {2: ["flat", "overlap", "static", "allgather"],
         4: ["flat", "overlap", "static", "allgather", "hierarchical", "hierarchical_overlap"]}


def placement_table(ex: dict) -> Optional[PlacementTable]:
    """The example's random placement: the experts shuffled over the ranks, plus up to
    ``extra`` replicas per rank of experts the rank does not hold yet (None: the
    contiguous identity layout)."""
    if ex.get("placement") is None:
        return None
    extra, seed = ex["placement"]
    ep, E = ex["ep"], ex["num_experts"]
    extra = min(extra, E - E // ep)  # a rank holds each expert at most once
    rng = random.Random(seed)
    experts = list(range(E))
    rng.shuffle(experts)
    slots: list[int] = []
    for r in range(ep):
        mine = experts[r * (E // ep) : (r + 1) * (E // ep)]
        slots += mine + rng.sample([g for g in range(E) if g not in mine], extra)
    return PlacementTable(tuple(slots), E, ep)


@st.composite
def examples(draw: Any, ep: int) -> dict:
    per_rank = draw(st.integers(1, 3))
    num_experts = ep * per_rank
    router = draw(st.sampled_from(ROUTERS))
    mode = draw(st.sampled_from(MODES[ep]))
    top_k = 1 if router == "switch" else draw(st.integers(1, min(num_experts, 4)))
    capacity = draw(st.one_of(st.none(), st.floats(0.25, 3.0, allow_nan=False)))
    if capacity is None and (mode == "static" or router == "expert_choice"):
        capacity = draw(st.floats(0.25, 3.0, allow_nan=False))  # these need a capacity
    skew = draw(st.sampled_from([None, None, "one", "avoid_rank", "only_rank"]))
    tokens = draw(st.lists(st.one_of(st.just(0), st.integers(1, 24)), min_size=ep, max_size=ep))
    if mode == "static":
        tokens = [tokens[0]] * ep  # a static exchange needs the same capacity everywhere
    return {
        "ep": ep,
        "hidden": draw(st.sampled_from([4, 8, 12])),
        "ffn": draw(st.sampled_from([4, 8, 16])),
        "num_experts": num_experts,
        "top_k": top_k,
        "router": router,
        "top_p": draw(st.floats(0.2, 1.0)) if router == "top_p" else None,
        "backend": draw(st.sampled_from(["loop", "bmm", "grouped_mm"])),
        "mode": mode,
        "chunks": draw(st.integers(2, 4)),
        "capacity_factor": capacity,
        "min_capacity": draw(st.integers(0, 4)),
        "drop_policy": draw(st.sampled_from(["position", "probs"])),
        "tokens": tokens,
        "skew": skew,
        "skew_target": draw(st.integers(0, num_experts - 1 if skew == "one" else ep - 1)),
        "seed": draw(st.integers(0, 2**16)),
        # Half the examples place the experts by a random table, some with replicas.
        "placement": draw(st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(0, 2**16)))),
        "allgather_max_tokens": draw(st.integers(8, 32)),
        # The hierarchical modes run over two emulated nodes of 2 ranks (EP=4 only).
        "ranks_per_node": 2 if mode.startswith("hierarchical") else 0,
    }


def mode_overrides(ex: dict) -> dict:
    mode = ex.get("mode", "flat")
    out: dict[str, Any] = {}
    if mode.startswith("hierarchical"):
        out["a2a_algorithm"] = "hierarchical"
    if mode.endswith("overlap"):
        out["overlap_chunks"] = ex.get("chunks", 2)
    if mode == "static":
        out.update(static_shapes=True, nonfinite_policy="count")
    if mode == "allgather":  # padded all-gather; a rank over the cap makes all fall back to flat
        out.update(a2a_algorithm="allgather", allgather_max_tokens=ex.get("allgather_max_tokens", 32))
    return out


def build_layer(ex: dict, groups: Optional[ParallelGroups], reference: bool = False) -> MoELayer:
    modes = mode_overrides(ex)
    table = None if reference else placement_table(ex)
    if reference:  # EP=1 reference: no exchange to shape (static keeps its padded path)
        modes = {k: v for k, v in modes.items() if k in ("static_shapes", "nonfinite_policy")}
    if table is not None:
        modes["num_redundant_experts"] = table.num_slots - ex["num_experts"]
    cap = ex["capacity_factor"]
    cfg = MoEConfig(hidden_size=ex["hidden"], ffn_hidden_size=ex["ffn"], num_experts=ex["num_experts"],
                    top_k=ex["top_k"], router=ex["router"], capacity_factor=cap,
                    eval_capacity_factor=cap if modes.get("static_shapes") or ex["router"] == "expert_choice"
                    else None, top_p=ex.get("top_p"), expert_backend=ex.get("backend", "auto"),
                    min_capacity=ex["min_capacity"], drop_policy=ex["drop_policy"],
                    aux_loss_coeff=0.01, z_loss_coeff=0.001,
                    bias_update_rate=0.01 if ex["router"] == "sigmoid_topk" else 0.0, **modes)
    layer = MoELayer(cfg, groups, seed=ex["seed"], name="property")
    if table is not None:
        layer.set_placement(table)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(ex["seed"])
        if ex["router"] == "sigmoid_topk":
            layer.router.expert_bias.copy_(torch.randn(ex["num_experts"], generator=gen) * 0.3)
        if layer.router.noise_weight is not None:
            layer.router.noise_weight.copy_(torch.randn(layer.router.noise_weight.shape, generator=gen))
    if ex["skew"] is not None:
        with torch.no_grad():
            w = layer.router.weight
            w.mul_(0.1)
            e = ex["num_experts"] // ex["ep"]
            target = ex["skew_target"]
            if ex["skew"] == "one":
                w[target] += 1.0  # with positive inputs, every token's first choice
            elif ex["skew"] == "avoid_rank":
                w[target * e : (target + 1) * e] -= 5.0  # that rank's experts get nothing
            else:  # only_rank: every token prefers that rank's experts
                w[target * e : (target + 1) * e] += 5.0
    return layer


def batch(ex: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(ex["seed"] * 31 + rank)
    x = torch.randn(ex["tokens"][rank], ex["hidden"], generator=gen)
    if ex["skew"] is not None:
        x = x.abs() + 0.1  # positive inputs make the rigged router weights decisive
    return x, torch.randn(x.shape, generator=gen)


# ----------------------------------------------------------------------------- ranks
def _example_worker(rank: int, world: int, ex: dict) -> dict:
    """One example on the harness's live ranks (its pool: no spawn per example)."""
    groups = ParallelGroups.build(world, timeout=timedelta(seconds=60), ranks_per_node=ex.get("ranks_per_node", 0))
    layer = build_layer(ex, groups)
    x, cot = batch(ex, rank)
    torch.manual_seed(ex["seed"] + rank)  # noisy_topk: the same draws as the reference
    result = run_step(layer, x, cot)
    layer.sync_replica_grads()  # replicas: every slot then holds its expert's full grad
    result["grads"].update({f"experts.{n}": p.grad.detach().clone() for n, p in layer.experts.named_parameters()})
    return result


def run_example(ex: dict) -> list[dict]:
    return run_ranks(_example_worker, ex["ep"], ex, timeout=EXAMPLE_TIMEOUT_S)


# ----------------------------------------------------------------------------- checks
def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel():
        assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), \
            f"{what}: max abs diff {(a.double() - b.double()).abs().max().item():.3e}"


def check_example(ex: dict, results: list[dict]) -> None:
    refs = []
    for rank in range(ex["ep"]):
        layer = build_layer(ex, None, reference=True)
        x, cot = batch(ex, rank)
        torch.manual_seed(ex["seed"] + rank)
        refs.append(run_step(layer, x, cot))
    for rank, (got, ref) in enumerate(zip(results, refs)):
        tag = f"rank {rank}"
        _close(got["output"], ref["output"], f"{tag} output")
        _close(got["aux_loss"], ref["aux_loss"], f"{tag} aux_loss")
        _close(got["x_grad"], ref["x_grad"], f"{tag} input grad")
        for pname in ("router.weight", "router.noise_weight"):
            if pname in ref["grads"]:
                _close(got["grads"][pname], ref["grads"][pname], f"{tag} grad {pname}")
        for field in ("routed_E", "kept_E", "dropped_E", "capacity_E", "num_tokens",
                      "tokens_all_dropped", "nonfinite"):
            assert torch.equal(getattr(got["stats"], field), getattr(ref["stats"], field)), \
                f"{tag} stats.{field}"
        ids = got["expert_ids"]
        for name, grad in got["grads"].items():
            if name.startswith("experts."):
                want = sum(r["grads"][name][ids] for r in refs)  # ids: each slot's logical expert
                _close(grad, want, f"{tag} grad {name}")


PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True,
)


@PROPERTY_SETTINGS
@given(ex=examples(2))
def test_ep2_matches_ep1_reference(ex: dict) -> None:
    check_example(ex, run_example(ex))


@PROPERTY_SETTINGS
@given(ex=examples(4))
def test_ep4_matches_ep1_reference(ex: dict) -> None:
    check_example(ex, run_example(ex))


def test_pool_reports_a_failing_rank() -> None:
    """The harness itself can fail: a bad example surfaces as an error naming it, the pool
    is retired, and the next example runs on fresh ranks."""
    bad = {"ep": 2, "hidden": 8, "ffn": 8, "num_experts": 3, "top_k": 1, "router": "softmax_topk",
           "capacity_factor": None, "min_capacity": 0, "drop_policy": "position",
           "tokens": [3, 3], "skew": None, "skew_target": 0, "seed": 1}
    with pytest.raises(RuntimeError, match="num_experts=3 must be divisible by ep_size=2"):
        run_example(bad)
    good = dict(bad, num_experts=4)
    check_example(good, run_example(good))
