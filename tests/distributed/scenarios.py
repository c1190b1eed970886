"""Scenarios for the EP = N vs EP = 1 golden checks.

A scenario fixes a config, the tokens each rank holds, and optionally a routing skew
(router weights rigged so that tokens go where the scenario wants). The same function
builds the per-rank batch on the distributed ranks and in the single-process reference.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.moe.stats import MoEStats

D, F = 8, 12


def _cfg(**kw: Any) -> MoEConfig:
    base = dict(hidden_size=D, ffn_hidden_size=F, num_experts=8, top_k=2, aux_loss_coeff=0.01,
                z_loss_coeff=0.001)
    base.update(kw)
    return MoEConfig(**base)


# name -> (config, tokens per rank (cycled over ranks), skew)
SCENARIOS: dict[str, tuple[MoEConfig, list[int], Optional[str]]] = {
    "dropless_top2": (_cfg(), [13, 7, 20, 9], None),
    "capacity_position_top2": (_cfg(capacity_factor=1.0, min_capacity=1), [16, 11, 24, 5], None),
    "capacity_probs_top3": (_cfg(top_k=3, capacity_factor=1.25, drop_policy="probs", min_capacity=1),
                            [12, 18, 6, 15], None),
    "all_to_one_expert_dropless": (_cfg(top_k=1, router="switch"), [10, 6, 8, 12], "one"),
    "all_to_one_expert_capacity": (_cfg(top_k=2, capacity_factor=1.0, min_capacity=2), [10, 6, 8, 12], "one"),
    "last_rank_gets_nothing": (_cfg(), [9, 14, 7, 11], "avoid_last"),
    "rank_with_one_token": (_cfg(capacity_factor=1.5, min_capacity=1), [1, 17, 1, 8], None),
    "rank_with_no_tokens": (_cfg(), [0, 12, 5, 0], None),
    "topk_equals_experts": (_cfg(num_experts=4, top_k=4, capacity_factor=1.0, min_capacity=1),
                            [10, 7, 12, 3], None),
    "uniform_tokens_capacity": (_cfg(capacity_factor=1.0, min_capacity=1), [12, 12, 12, 12], None),
    "uniform_tokens_skewed": (_cfg(capacity_factor=1.25, min_capacity=2), [10, 10, 10, 10], "one"),
    "sigmoid_gelu": (_cfg(router="sigmoid_topk", activation="gelu", capacity_factor=2.0), [14, 9, 6, 11], None),
}


def static_shape_scenarios() -> list[str]:
    """Scenarios the padded static-shape mode supports: a capacity and the same number
    of tokens on every rank (a static all-to-all needs the same capacity everywhere)."""
    return [n for n, (cfg, tokens, _) in SCENARIOS.items()
            if cfg.capacity_factor is not None and len(set(tokens)) == 1]


def batch(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input tokens and a loss cotangent for ``rank`` in scenario ``name``."""
    cfg, tokens, skew = SCENARIOS[name]
    t = tokens[rank % len(tokens)]
    gen = torch.Generator().manual_seed(1000 * rank + sum(map(ord, name)))
    x = torch.randn(t, cfg.hidden_size, generator=gen)
    if skew is not None:
        x = x.abs() + 0.1  # positive inputs make the rigged router weights decisive
    cot = torch.randn(t, cfg.hidden_size, generator=gen)
    return x, cot


def build_layer(name: str, groups: Optional[ParallelGroups], **overrides: Any) -> MoELayer:
    """The scenario's layer; ``overrides`` change config fields that must not change
    the result (dispatch algorithm, expert backend, overlap ...)."""
    cfg, _, skew = SCENARIOS[name]
    if overrides:
        if overrides.get("static_shapes"):
            overrides = dict(overrides, eval_capacity_factor=cfg.capacity_factor, nonfinite_policy="count")
        cfg = cfg.replace(**overrides)
    layer = MoELayer(cfg, groups, seed=7, name=name)
    if skew is not None:
        with torch.no_grad():
            w = layer.router.weight
            w.mul_(0.1)
            if skew == "one":
                w[3] += 1.0  # expert 3 wins every token's first choice
            elif skew == "avoid_last":
                per_rank = cfg.num_experts // 4
                w[-per_rank:] -= 5.0  # the last quarter of experts gets nothing at EP=4
    return layer


def run_step(layer: MoELayer, x: torch.Tensor, cot: torch.Tensor) -> dict:
    """Forward + backward; returns outputs, stats and gradients (on CPU)."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=False)
    for p in layer.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    out = layer(x)
    loss = (out.output * cot).sum() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return {
        "output": out.output.detach().clone(),
        "aux_loss": out.aux_loss.detach().clone(),
        "stats": out.stats,
        "x_grad": x.grad.detach().clone(),
        "grads": grads,
        "expert_ids": list(layer.experts.expert_ids),
    }


TOL = 1e-5
"""fp32 tolerance of the golden checks (max abs diff)."""


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel():
        diff = (a.double() - b.double()).abs().max().item()
        assert diff <= TOL, f"{what}: max abs diff {diff:.3e} > {TOL}"


def assert_stats_equal(got: MoEStats, want: MoEStats, what: str) -> None:
    """Counts exactly equal, float sums within TOL."""
    for field in ("routed_E", "kept_E", "dropped_E", "capacity_E", "num_tokens",
                  "tokens_all_dropped", "nonfinite", "experts_per_token"):
        assert torch.equal(getattr(got, field), getattr(want, field)), f"{what}: stats.{field}"
    for field in ("lb_loss", "z_loss", "entropy_sum", "max_prob_sum"):
        assert_close(getattr(got, field), getattr(want, field), f"{what}: stats.{field}")
