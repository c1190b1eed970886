"""Today's MoE designs against the EP=1 reference under every dispatch mode.

DeepSeek-V3-style (sigmoid scores, selection bias, group-limited routing, scaling factor,
a shared expert, the sequence-wise loss), Qwen2-MoE-style (softmax, no renormalisation,
a gated shared expert), GPT-OSS-style (softmax over the top-k logits), node-limited
routing, and an fp64 router with a shared expert computed after the routed ones: each
dropless and with drops, in the five modes of ``test_dispatch_matrix.py``. Forward
output, aux loss, input gradient, router gradient (through the scaling factor and the
groups), every expert's gradient, the shared expert's gradients (replicated: each rank's
own) and the stats must equal the reference; fp32, max abs diff <= 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from tests.distributed import scenarios as sc
from tests.distributed.test_dispatch_matrix import MODES
from tests.harness import run_ranks

D, F, E = 8, 12, 8
DESIGNS: dict[str, dict[str, Any]] = {
    "deepseek": dict(router="sigmoid_topk", top_k=3, num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                     num_shared_experts=1, bias_update_rate=0.01, aux_loss_scope="sequence",
                     expert_backend="grouped_mm"),
    "qwen2": dict(router="softmax_topk", normalize_topk=False, num_shared_experts=2, shared_expert_ffn_hidden=20,
                  shared_expert_gate=True, expert_backend="bmm"),
    "gpt_oss": dict(router="topk_softmax", top_k=2, activation="swiglu"),
    "node_limited": dict(router="softmax_topk", num_groups=2, topk_groups=1, top_k=2),
    "fp64_router": dict(router="softmax_topk", router_dtype="fp64", num_shared_experts=1,
                        shared_expert_overlap=False, activation="gelu"),
}
SEQS = [(3, 4), (1, 7), (4, 5), (2, 3)]   # (sequences, tokens per sequence) per rank
STATIC_SEQS = [(3, 4)] * 4


def cases(mode: str) -> list[tuple[str, str]]:
    caps = ("capacity",) if mode == "static" else ("dropless", "capacity")
    return [(d, c) for d in DESIGNS for c in caps]


def build(design: str, cap: str, overrides: dict, groups: Optional[ParallelGroups]) -> MoELayer:
    kw: dict[str, Any] = dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, aux_loss_coeff=0.01,
                              z_loss_coeff=0.001, min_capacity=1, **DESIGNS[design])
    if cap == "capacity":
        kw.update(capacity_factor=0.75, eval_capacity_factor=0.75)
    layer = MoELayer(MoEConfig(**kw, **overrides), groups, seed=13, name=design)
    with torch.no_grad():
        layer.router.weight.mul_(20.0)
        if kw["router"] == "sigmoid_topk":
            layer.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.3)
    return layer


def batch(mode: str, rank: int, case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = (STATIC_SEQS if mode == "static" else SEQS)[rank]
    gen = torch.Generator().manual_seed(10 * rank + sum(map(ord, "/".join(case))))
    return torch.randn(b, s, D, generator=gen), torch.randn(b, s, D, generator=gen)


def step(mode: str, case: tuple, rank: int, groups: Optional[ParallelGroups], overrides: dict) -> dict:
    return sc.run_step(build(*case, overrides, groups), *batch(mode, rank, case))


def _worker(rank: int, world: int, mode: str) -> dict:
    _, ep, group_kwargs, overrides = MODES[mode]
    groups = ParallelGroups.build(ep, **group_kwargs)
    out = {}
    for case in cases(mode):
        out[case] = step(mode, case, rank, groups, overrides)
        out[case]["ep_ranks"] = list(groups.ep_ranks)
    return out


@functools.lru_cache(maxsize=None)
def results(mode: str) -> list[dict]:
    return run_ranks(_worker, MODES[mode][0], mode, timeout=400)


@functools.lru_cache(maxsize=None)
def reference(mode: str, case: tuple, rank: int) -> dict:
    overrides = {k: v for k, v in MODES[mode][3].items() if k in ("static_shapes", "nonfinite_policy")}
    return step(mode, case, rank, None, overrides)


CASES = [(m, c) for m in MODES for c in cases(m)]


@pytest.mark.parametrize("mode,case", CASES, ids=[f"{m}-{'-'.join(c)}" for m, c in CASES])
def test_design_matches_ep1_reference(mode: str, case: tuple) -> None:
    for rank, res in enumerate(results(mode)):
        got, ref = res[case], reference(mode, case, rank)
        tag = f"{mode}/{'/'.join(case)}/rank{rank}"
        for key in ("output", "aux_loss", "x_grad"):
            sc.assert_close(got[key], ref[key], f"{tag} {key}")
        sc.assert_stats_equal(got["stats"], ref["stats"], tag)
        for pname, grad in got["grads"].items():
            if pname.startswith("experts."):
                ids = got["expert_ids"]
                want = sum(reference(mode, case, r)["grads"][pname][ids[0] : ids[-1] + 1]
                           for r in got["ep_ranks"])
            else:  # router and shared expert: replicated, each rank's own batch
                want = ref["grads"][pname]
            sc.assert_close(grad, want, f"{tag} grad {pname}")
        if DESIGNS[case[0]].get("num_shared_experts"):
            assert any(p.startswith("shared.") for p in got["grads"]), tag


def test_capacity_designs_really_drop() -> None:
    for design in DESIGNS:
        dropped = sum(int(reference("flat", (design, "capacity"), r)["stats"].dropped_E.sum())
                      for r in range(4))
        assert dropped > 0, design
