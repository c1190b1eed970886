"""Top-p routing (variable experts per token) against hand-computed references.

With an identity gate (D = E) and inputs ``x_t = log(p_t)`` the softmax returns
``p_t`` exactly (up to fp32 rounding), so every decision below is worked out by hand:

    token  probs (experts 0..3)      sorted desc, mass before each    top_p=0.6, max k=3
    t0     .50 .30 .15 .05           .50@0 (0)  .30@1 (.5)  .15@2 (.8)   -> {0, 1}
    t1     .10 .70 .10 .10           .70@1 (0)  .10 (.7)                 -> {1}
    t2     .22 .28 .24 .26           .28@1 (0)  .26@3 (.28) .24@2 (.54)  -> {1, 3, 2}
    t3     .05 .05 .05 .85           .85@3 (0)                           -> {3}
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.router import Router
from expert_parallel.moe.scoring import top_p_mask

P_TE = [[0.50, 0.30, 0.15, 0.05], [0.10, 0.70, 0.10, 0.10],
        [0.22, 0.28, 0.24, 0.26], [0.05, 0.05, 0.05, 0.85]]
X_TD = torch.tensor([[math.log(p) for p in row] for row in P_TE])
E = 4


def _cfg(**kw: Any) -> MoEConfig:
    base: dict[str, Any] = dict(hidden_size=E, ffn_hidden_size=6, num_experts=E, top_k=3,
                                router="top_p", top_p=0.6)
    base.update(kw)
    return MoEConfig(**base)


def _identity_router(cfg: MoEConfig) -> Router:
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def _chosen(routing) -> list[list[int]]:
    return [[int(e) for e, v in zip(idx, val) if v]
            for idx, val in zip(routing.topk_idx_TK, routing.valid_TK)]


def test_experts_per_token_match_hand_reference() -> None:
    r = _identity_router(_cfg())(X_TD)
    assert _chosen(r) == [[0, 1], [1], [1, 3, 2], [3]]
    assert r.valid_TK.sum(-1).tolist() == [2, 1, 3, 1]


def test_weights_renormalised_over_valid_slots_and_zero_elsewhere() -> None:
    r = _identity_router(_cfg())(X_TD)
    want = [[0.5 / 0.8, 0.3 / 0.8, 0.0], [1.0, 0.0, 0.0],
            [0.28 / 0.78, 0.26 / 0.78, 0.24 / 0.78], [1.0, 0.0, 0.0]]
    assert torch.allclose(r.topk_weight_TK, torch.tensor(want), atol=1e-6)


def test_raw_weights_without_renormalisation() -> None:
    r = _identity_router(_cfg(normalize_topk=False))(X_TD)
    want = [[0.5, 0.3, 0.0], [0.7, 0.0, 0.0], [0.28, 0.26, 0.24], [0.85, 0.0, 0.0]]
    assert torch.allclose(r.topk_weight_TK, torch.tensor(want), atol=1e-6)


def test_max_k_bounds_the_count() -> None:
    r = _identity_router(_cfg(top_k=2))(X_TD)
    assert r.valid_TK.sum(-1).tolist() == [2, 1, 2, 1]


@pytest.mark.parametrize("top_p,counts", [(0.05, [1, 1, 1, 1]), (0.51, [2, 1, 2, 1]),
                                          (0.88, [3, 3, 3, 2]), (1.0, [3, 3, 3, 3])])
def test_counts_for_several_thresholds(top_p: float, counts: list[int]) -> None:
    # mass before slots 1 and 2: t0 .5/.8, t1 .7/.8, t2 .28/.54, t3 .85/.9
    r = _identity_router(_cfg(top_p=top_p))(X_TD)
    assert r.valid_TK.sum(-1).tolist() == counts


def test_mask_function_at_least_one() -> None:
    sorted_TK = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    assert top_p_mask(sorted_TK, 1e-9).tolist() == [[True, False, False], [True, False, False]]
    # mass before the slots of row 1: 0, .4, .75 -> strict "< top_p"
    assert top_p_mask(sorted_TK, 0.75).tolist() == [[True, False, False], [True, True, False]]
    assert top_p_mask(sorted_TK, 0.76).tolist() == [[True, False, False], [True, True, True]]


def test_load_balancing_loss_counts_only_valid_pairs() -> None:
    r = _identity_router(_cfg())(X_TD)
    # valid pairs per expert: e0 1, e1 3, e2 1, e3 2 (7 pairs); P = column means of P_TE
    f = [1 / 7, 3 / 7, 1 / 7, 2 / 7]
    p = [sum(row[e] for row in P_TE) / 4 for e in range(E)]
    assert r.lb_loss.item() == pytest.approx(E * sum(a * b for a, b in zip(f, p)), abs=1e-6)


def _dense_reference(layer: MoELayer, x_TD: torch.Tensor, chosen: list[list[int]],
                     weights: list[list[float]]) -> torch.Tensor:
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t, (es, ws) in enumerate(zip(chosen, weights)):
        for e, w in zip(es, ws):
            h = torch.nn.functional.silu(x_TD[t] @ ex.w1_eDF[e]) * (x_TD[t] @ ex.w3_eDF[e])
            out[t] += w * (h @ ex.w2_eFD[e])
    return out


def test_layer_output_stats_and_dispatch_of_variable_k() -> None:
    layer = MoELayer(_cfg(), seed=3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    out = layer(X_TD)
    chosen = [[0, 1], [1], [1, 3, 2], [3]]
    weights = [[0.5 / 0.8, 0.3 / 0.8], [1.0], [0.28 / 0.78, 0.26 / 0.78, 0.24 / 0.78], [1.0]]
    with torch.no_grad():
        want = _dense_reference(layer, X_TD, chosen, weights)
    assert torch.allclose(out.output, want, atol=1e-6)
    s = out.stats
    assert s.routed_E.tolist() == [1, 3, 1, 2]  # invalid slots are not routed
    assert s.kept_E.tolist() == [1, 3, 1, 2]
    assert s.experts_per_token.tolist() == [0, 2, 1, 1]
    assert s.experts_per_token_mean() == pytest.approx(7 / 4)
    assert s.to_dict()["experts_per_token_hist"] == [0, 2, 1, 1]


def test_capacity_applies_to_valid_pairs_only() -> None:
    # capacity C = max(1, ceil(0.25 * 4 * 3 / 4)) = 1; expert 1 is routed 3 valid pairs
    # (t0 slot 1, t1 slot 0, t2 slot 0); position priority keeps first choices first:
    # t1 slot 0 (pair 0*T+1) beats t2 slot 0 (0*T+2) beats t0 slot 1.
    layer = MoELayer(_cfg(capacity_factor=0.25, min_capacity=1), seed=3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    s = layer(X_TD).stats
    assert s.routed_E.tolist() == [1, 3, 1, 2]
    assert s.kept_E.tolist() == [1, 1, 1, 1]
    assert s.dropped_E.tolist() == [0, 2, 0, 1]
    assert int(s.tokens_all_dropped) == 0


@pytest.mark.parametrize("top_p", [1.0, 1.0 - 1e-6])
def test_p_to_one_with_max_k_equals_top_k(top_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 8, generator=gen)
    cot = torch.randn(23, 8, generator=gen)
    base = dict(hidden_size=8, ffn_hidden_size=6, num_experts=8, top_k=8, z_loss_coeff=0.01)
    results = []
    for cfg in (MoEConfig(**base), MoEConfig(**base, router="top_p", top_p=top_p)):
        layer = MoELayer(cfg, seed=5)
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        ((out.output * cot).sum() + out.aux_loss).backward()
        results.append((out, xg.grad, layer.router.weight.grad, layer.experts.w1_eDF.grad))
    (a, *ga), (b, *gb) = results
    assert torch.equal(a.stats.routed_E, b.stats.routed_E)
    assert torch.allclose(a.output, b.output, atol=1e-6)
    assert torch.allclose(a.aux_loss, b.aux_loss, atol=1e-7)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-6)


def test_top_p_one_equals_top_k_routing_for_k_below_e() -> None:
    x = torch.randn(17, E, generator=torch.Generator().manual_seed(1))
    a = _identity_router(_cfg(router="softmax_topk", top_p=None, top_k=2))(x)
    b = _identity_router(_cfg(top_p=1.0, top_k=2))(x)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK)
    assert torch.allclose(a.topk_weight_TK, b.topk_weight_TK, atol=1e-7)
    assert bool(b.valid_TK.all())


@pytest.mark.parametrize("changes,needle", [
    (dict(top_p=None), "top_p must be set"),
    (dict(top_p=0.0), "top_p must be finite and > 0"),
    (dict(top_p=1.5), "top_p must be <= 1, got 1.5"),
    (dict(router="softmax_topk", top_p=0.5), "top_p is only used by router='top_p', got top_p=0.5"),
])
def test_config_validation_names_field_and_value(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**changes)


def test_config_top_p_type_error() -> None:
    with pytest.raises(TypeError, match="top_p must be a float"):
        _cfg(top_p="0.5")
