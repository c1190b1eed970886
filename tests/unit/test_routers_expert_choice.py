"""Expert-choice routing against a hand-worked case.

Identity gate, ``x_t = log(p_t)``, so the router's probabilities are ``p_t``.
E = 3, T = 6, top_k = 1, capacity_factor = 1, min_capacity = 1:
``C = max(1, ceil(1 * 6 * 1 / 3)) = 2`` tokens per expert.

    token  probs (e0 e1 e2)
    t0     .80 .15 .05
    t1     .70 .25 .05
    t2     .40 .35 .25
    t3     .60 .20 .20       <- nobody's top 2: dropped (zeros out)
    t4     .10 .30 .60       <- chosen twice
    t5     .05 .05 .90

    e0 column .80 .70 .40 .60 .10 .05 -> t0, t1
    e1 column .15 .25 .35 .20 .30 .05 -> t2, t4
    e2 column .05 .05 .25 .20 .60 .90 -> t5, t4
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.router import Router

P_TE = [[0.80, 0.15, 0.05], [0.70, 0.25, 0.05], [0.40, 0.35, 0.25],
        [0.60, 0.20, 0.20], [0.10, 0.30, 0.60], [0.05, 0.05, 0.90]]
X_TD = torch.tensor([[math.log(p) for p in row] for row in P_TE])
E = 3
CHOSEN = [[0], [0], [1], [], [1, 2], [2]]


def _cfg(**kw: Any) -> MoEConfig:
    base: dict[str, Any] = dict(hidden_size=E, ffn_hidden_size=5, num_experts=E, top_k=1,
                                router="expert_choice", capacity_factor=1.0,
                                eval_capacity_factor=1.0, min_capacity=1)
    base.update(kw)
    return MoEConfig(**base)


def _layer(**kw: Any) -> MoELayer:
    layer = MoELayer(_cfg(**kw), seed=11)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    return layer


def test_each_expert_takes_its_top_c_tokens() -> None:
    router = Router(_cfg())
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    r = router(X_TD)
    assert r.topk_idx_TK.tolist() == [[0, 1, 2]] * 6  # slot e is expert e
    chosen = [[e for e in range(E) if r.valid_TK[t, e]] for t in range(6)]
    assert chosen == CHOSEN
    want_w = [[P_TE[t][e] if e in CHOSEN[t] else 0.0 for e in range(E)] for t in range(6)]
    assert torch.allclose(r.topk_weight_TK, torch.tensor(want_w), atol=1e-6)  # never renormalised
    assert r.valid_TK.sum(0).tolist() == [2, 2, 2]


def test_layer_output_and_stats() -> None:
    layer = _layer()
    out = layer(X_TD)
    ex = layer.experts
    want = torch.zeros_like(X_TD)
    with torch.no_grad():
        for t, es in enumerate(CHOSEN):
            for e in es:
                h = torch.nn.functional.silu(X_TD[t] @ ex.w1_eDF[e]) * (X_TD[t] @ ex.w3_eDF[e])
                want[t] += P_TE[t][e] * (h @ ex.w2_eFD[e])
    assert torch.allclose(out.output, want, atol=1e-6)
    assert torch.equal(out.output[3], torch.zeros(E))  # chosen by nobody
    s = out.stats
    assert s.routed_E.tolist() == [2, 2, 2]
    assert s.kept_E.tolist() == [2, 2, 2]
    assert s.dropped_E.tolist() == [0, 0, 0]  # no expert overflows
    assert s.capacity_E.tolist() == [2, 2, 2]
    assert int(s.tokens_all_dropped) == 1  # t3: this router's drop
    assert s.experts_per_token.tolist() == [1, 4, 1, 0]
    assert s.experts_per_token_mean() == pytest.approx(1.0)
    assert s.lb_loss.item() == pytest.approx(1.0, abs=1e-6)  # f is uniform by construction


def test_capacity_above_token_count_takes_every_token() -> None:
    # T = 2 < C = min_capacity = 4: each expert takes both tokens (a dense layer).
    out = _layer(min_capacity=4)(X_TD[:2])
    assert out.stats.routed_E.tolist() == [2, 2, 2]
    assert out.stats.experts_per_token.tolist() == [0, 0, 0, 2]
    assert int(out.stats.tokens_all_dropped) == 0


def test_eval_uses_eval_capacity_factor() -> None:
    layer = _layer(eval_capacity_factor=0.5)  # C = max(1, ceil(0.5 * 6 / 3)) = 1
    layer.eval()
    s = layer(X_TD).stats
    assert s.routed_E.tolist() == [1, 1, 1]
    # e0 -> t0, e1 -> t2, e2 -> t5
    assert int(s.tokens_all_dropped) == 3


def test_zero_tokens() -> None:
    out = _layer()(X_TD[:0])
    assert out.output.shape == (0, E)
    assert out.stats.routed_E.tolist() == [0, 0, 0]
    assert torch.isfinite(out.aux_loss)


def test_static_shapes_give_the_same_result() -> None:
    x = torch.randn(9, E, generator=torch.Generator().manual_seed(2))
    a, b = _layer(), _layer(static_shapes=True, nonfinite_policy="count")
    oa, ob = a(x), b(x)
    assert torch.allclose(oa.output, ob.output, atol=1e-6)
    assert torch.equal(oa.stats.kept_E, ob.stats.kept_E)


def test_gradient_reaches_router_through_chosen_weights() -> None:
    layer = _layer()
    x = X_TD.clone().requires_grad_(True)
    layer(x).output.sum().backward()
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0
    # t3 was chosen by nobody: no output depends on it differentiably.
    assert torch.equal(x.grad[3], torch.zeros(E))
    assert x.grad[4].abs().sum() > 0


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
def test_config_needs_capacity(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be set for router='expert_choice'.*got None"):
        _cfg(**{field: None})
