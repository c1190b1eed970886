"""The complete dispatcher matrix against the EP=1 reference.

Every router x every dispatch mode x every expert backend x (dropless, with drops), on
4 real gloo ranks, each mode in ONE spawn. The parent runs an EP=1 layer on each rank's
batch. Per rank: forward output, aux loss, input gradient, router gradients (gate and
noise weights), every expert's gradient (the owner's = the sum of the reference
gradients over its EP group) and the per-expert routed/kept/dropped counts must match;
fp32, max abs diff <= 1e-5. Every capacity scenario is asserted to drop pairs, so no
case passes vacuously.

Modes: flat (EP=4), overlap (EP=2 x expert-DP 2, 3 chunks), hierarchical (EP=4 over two
emulated 2-rank nodes), hierarchical + overlap (composed), static shapes (EP=4, padded;
equal tokens per rank, as a static exchange needs), all-gather (every rank under the cap;
and over it, where all ranks fall back to the flat exchange), auto (after a warm-up
forward, the all-gather path).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.distributed.collectives import CALL_COUNTS
from tests.distributed import scenarios as sc
from tests.harness import run_ranks

D, F, E = 8, 12, 8
ROUTERS = {
    "softmax_topk": {},
    "switch": {"top_k": 1},
    "sigmoid_topk": {"bias_update_rate": 0.01},
    "noisy_topk": {},
    "top_p": {"top_p": 0.5, "top_k": 3},
    "expert_choice": {},
}
BACKENDS = ("loop", "bmm", "grouped_mm")
# name -> (world, ep, ParallelGroups.build kwargs, config overrides)
MODES = {
    "flat": (4, 4, {}, {}),
    "overlap": (4, 2, {}, {"overlap_chunks": 3}),
    "hierarchical": (4, 4, {"ranks_per_node": 2}, {"a2a_algorithm": "hierarchical"}),
    "hierarchical_overlap": (4, 4, {"ranks_per_node": 2},
                             {"a2a_algorithm": "hierarchical", "overlap_chunks": 2}),
    "static": (4, 4, {}, {"static_shapes": True, "nonfinite_policy": "count"}),
    # All-gather / reduce-scatter of padded tokens (decode-size batches): every rank fits...
    "allgather": (4, 4, {}, {"a2a_algorithm": "allgather", "allgather_max_tokens": 20}),
    # ... or one rank holds more than the cap: every rank runs the flat exchange instead.
    "allgather_fallback": (4, 2, {}, {"a2a_algorithm": "allgather", "allgather_max_tokens": 12}),
    # auto: a warm-up forward (flat) teaches every rank the token counts; then all-gather.
    "auto": (4, 4, {}, {"a2a_algorithm": "auto", "allgather_max_tokens": 24}),
}
TOKENS = [13, 7, 20, 9]
STATIC_TOKENS = [12, 12, 12, 12]


def scenarios(mode: str) -> list[tuple[str, str, str]]:
    """(router, backend, capacity) cases a mode runs: the padded path needs a capacity;
    expert choice always has one (each expert takes its top-C tokens)."""
    caps = ("capacity",) if mode == "static" else ("dropless", "capacity")
    return [(r, b, c) for r in ROUTERS for b in BACKENDS for c in caps
            if not (r == "expert_choice" and c == "dropless")]


def config(router: str, backend: str, cap: str, overrides: dict) -> MoEConfig:
    kw: dict[str, Any] = dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2,
                              router=router, expert_backend=backend, aux_loss_coeff=0.01,
                              z_loss_coeff=0.001, min_capacity=1)
    kw.update(ROUTERS[router])
    if cap == "capacity":
        # Tight enough that every router drops somewhere (asserted below); expert choice
        # "drops" the tokens no expert picks, which needs fewer slots than tokens.
        cf = 0.3 if router == "expert_choice" else 0.75
        kw.update(capacity_factor=cf, eval_capacity_factor=cf, drop_policy="probs")
    kw.update(overrides)
    return MoEConfig(**kw)


def build(router: str, backend: str, cap: str, overrides: dict, groups: Optional[ParallelGroups]) -> MoELayer:
    layer = MoELayer(config(router, backend, cap, overrides), groups, seed=11, name=f"{router}/{backend}")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        layer.router.weight.mul_(20.0)  # peaked probabilities: top-p varies its k, drops happen
        if router == "sigmoid_topk":  # a selection bias as after some aux-loss-free updates
            layer.router.expert_bias.copy_(torch.randn(E, generator=gen) * 0.3)
        if layer.router.noise_weight is not None:
            layer.router.noise_weight.copy_(torch.randn(E, D, generator=gen) * 0.5)
    return layer


def batch(mode: str, rank: int, case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = (STATIC_TOKENS if mode == "static" else TOKENS)[rank]
    gen = torch.Generator().manual_seed(100 * rank + sum(map(ord, "/".join(case))))
    return torch.randn(tokens, D, generator=gen), torch.randn(tokens, D, generator=gen)


def step(mode: str, case: tuple, rank: int, groups: Optional[ParallelGroups], overrides: dict) -> dict:
    layer = build(*case, overrides, groups)
    x, cot = batch(mode, rank, case)
    if overrides.get("a2a_algorithm") == "auto":
        with torch.no_grad():
            layer(x)  # the first forward runs flat and records every rank's token count
    torch.manual_seed(7000 + rank)  # noisy_topk: the reference draws the same noise
    return sc.run_step(layer, x, cot)


def _worker(rank: int, world: int, mode: str) -> dict:
    _, ep, group_kwargs, overrides = MODES[mode]
    groups = ParallelGroups.build(ep, **group_kwargs)
    out = {}
    for case in scenarios(mode):
        res = step(mode, case, rank, groups, overrides)
        res["ep_ranks"] = list(groups.ep_ranks)
        res["dispatcher"] = build(*case, overrides, None).dispatcher.describe()
        out[case] = res
    out["describe"] = MoELayer(config("softmax_topk", "loop", "capacity", overrides), groups).dispatcher.describe()
    out["fallbacks"] = CALL_COUNTS["allgather_fallback"]
    return out


@functools.lru_cache(maxsize=None)
def results(mode: str) -> list[dict]:
    world = MODES[mode][0]
    return run_ranks(_worker, world, mode, timeout=400)


@functools.lru_cache(maxsize=None)
def reference(mode: str, case: tuple, rank: int) -> dict:
    overrides = {k: v for k, v in MODES[mode][3].items() if k in ("static_shapes", "nonfinite_policy")}
    return step(mode, case, rank, None, overrides)


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_runs_the_dispatcher_it_names(mode: str) -> None:
    want = {"flat": "all_to_all", "overlap": "all_to_all+overlap(3)",
            "hierarchical": "hierarchical(ranks_per_node=2)",
            "hierarchical_overlap": "hierarchical(ranks_per_node=2)+overlap(2)", "static": "padded",
            "allgather": "allgather(max_tokens=20)", "allgather_fallback": "allgather(max_tokens=12)",
            "auto": "auto(allgather up to 24 tokens/rank, else all_to_all)"}
    assert all(r["describe"] == want[mode] for r in results(mode))


def test_allgather_paths_really_ran() -> None:
    """Not vacuous: the all-gather modes took their own path (or fell back) as meant."""
    assert all(r["fallbacks"] == 0 for r in results("allgather"))
    assert all(r["fallbacks"] == len(scenarios("allgather_fallback")) for r in results("allgather_fallback"))
    assert all(r["fallbacks"] == 0 for r in results("auto"))


CASES = [(m, c) for m in MODES for c in scenarios(m)]


@pytest.mark.parametrize("mode,case", CASES, ids=[f"{m}-{'-'.join(c)}" for m, c in CASES])
def test_matrix_matches_ep1_reference(mode: str, case: tuple) -> None:
    got_all = results(mode)
    for rank, res in enumerate(got_all):
        got, ref = res[case], reference(mode, case, rank)
        tag = f"{mode}/{'/'.join(case)}/rank{rank}"
        sc.assert_close(got["output"], ref["output"], f"{tag} output")
        sc.assert_close(got["aux_loss"], ref["aux_loss"], f"{tag} aux_loss")
        sc.assert_close(got["x_grad"], ref["x_grad"], f"{tag} input grad")
        sc.assert_stats_equal(got["stats"], ref["stats"], tag)
        for pname in ("router.weight", "router.noise_weight"):
            if pname in ref["grads"]:
                sc.assert_close(got["grads"][pname], ref["grads"][pname], f"{tag} grad {pname}")
        ids = got["expert_ids"]
        for pname, grad in got["grads"].items():
            if pname.startswith("experts."):
                want = sum(reference(mode, case, r)["grads"][pname][ids[0] : ids[-1] + 1]
                           for r in got["ep_ranks"])
                sc.assert_close(grad, want, f"{tag} grad {pname}")


@pytest.mark.parametrize("mode", list(MODES))
def test_capacity_cases_really_drop(mode: str) -> None:
    for case in scenarios(mode):
        if case[2] != "capacity":
            continue
        dropped = sum(int(reference(mode, case, r)["stats"].dropped_E.sum()) +
                      int(reference(mode, case, r)["stats"].tokens_all_dropped) for r in range(4))
        assert dropped > 0, f"{mode}/{case}: the capacity case dropped nothing"


# -------------------------------------------------------------- refused combinations
STATIC = {"static_shapes": True, "capacity_factor": 1.0, "eval_capacity_factor": 1.0}
REFUSED = {
    # (config overrides, ParallelGroups.build kwargs) -> the fields the message names
    "static+overlap": ({**STATIC, "nonfinite_policy": "count", "overlap_chunks": 2}, {},
                       ("static_shapes=True", "overlap_chunks=2")),
    "static+hierarchical": ({**STATIC, "nonfinite_policy": "count", "a2a_algorithm": "hierarchical"},
                            {"ranks_per_node": 1}, ("static_shapes=True", "a2a_algorithm='hierarchical'")),
    "static+raise": ({**STATIC, "nonfinite_policy": "raise"}, {},
                     ("static_shapes=True", "nonfinite_policy='raise'")),
    "hierarchical without ranks_per_node": ({"a2a_algorithm": "hierarchical"}, {},
                                            ("a2a_algorithm='hierarchical'", "ranks_per_node=0")),
}


def _refusal_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out = {}
    for name, (overrides, group_kwargs, _) in REFUSED.items():
        groups = ParallelGroups.build(2, **group_kwargs)
        try:
            MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, **overrides), groups)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
        # The ranks are still in step: a collective right after completes.
        t = torch.ones(1)
        dist.all_reduce(t)
        out[name + "/after"] = float(t)
    return out


def test_refused_combinations_raise_named_errors_on_every_rank() -> None:
    for rank_out in run_ranks(_refusal_worker, 2, timeout=120):
        for name, (_, _, fields) in REFUSED.items():
            message = rank_out[name]
            assert message is not None, f"{name}: accepted"
            for field in fields:
                assert field in message, f"{name}: {field!r} not named in {message!r}"
            assert rank_out[name + "/after"] == 2.0
