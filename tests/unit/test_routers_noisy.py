"""Noisy top-k gating (Shazeer et al. 2017) against hand-computed values.

Identity gate (D = E = 2), zero noise weight, so the noise scale is
``s = softplus(0) + 0.01 = ln 2 + 0.01`` everywhere; top_k = 1; eval mode (no noise):

    t0 clean logits [1, 0]: e0 in the top 1 -> P(e0) = Phi((1 - 0) / s)   (vs 2nd largest)
                            e1 out          -> P(e1) = Phi((0 - 1) / s)   (vs largest)
    t1 clean logits [0, 2]: e1 in  -> Phi(2 / s);  e0 out -> Phi(-2 / s)

    load       = [Phi(1/s) + Phi(-2/s),  Phi(-1/s) + Phi(2/s)]
    importance = [e / (1 + e),  e^2 / (1 + e^2)]         (top-1: raw gate probability)
    lb_loss    = cv2(importance) + cv2(load),   cv2([a, b]) = ((a - b) / (a + b))^2
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.balance import noisy_load
from expert_parallel.moe.router import Router
from expert_parallel.moe.scoring import NOISE_EPS

X_TD = torch.tensor([[1.0, 0.0], [0.0, 2.0]])


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cv2(a: float, b: float) -> float:
    return ((a - b) / (a + b)) ** 2


def _router(**kw: Any) -> Router:
    base: dict[str, Any] = dict(hidden_size=2, ffn_hidden_size=3, num_experts=2, top_k=1,
                                router="noisy_topk", aux_loss_coeff=0.1)
    base.update(kw)
    router = Router(MoEConfig(**base))
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    return router


def test_noise_weight_zero_init_and_shape() -> None:
    router = _router()
    assert router.noise_weight.shape == (2, 2)
    assert torch.equal(router.noise_weight, torch.zeros(2, 2))
    assert Router(MoEConfig(4, 4, 4)).noise_weight is None  # other routers have none


def test_eval_has_no_noise_and_hand_computed_losses() -> None:
    router = _router().eval()
    r = router(X_TD)
    assert r.topk_idx_TK.tolist() == [[0], [1]]
    e = math.e
    assert torch.allclose(r.topk_weight_TK, torch.tensor([[e / (1 + e)], [e * e / (1 + e * e)]]))
    s = math.log(2.0) + NOISE_EPS
    load = [_phi(1 / s) + _phi(-2 / s), _phi(-1 / s) + _phi(2 / s)]
    imp = [e / (1 + e), e * e / (1 + e * e)]
    want = _cv2(*imp) + _cv2(*load)
    assert r.lb_loss.item() == pytest.approx(want, abs=1e-6)
    assert r.aux_loss.item() == pytest.approx(0.1 * want, abs=1e-7)  # coefficient applied


def test_training_adds_scaled_gaussian_noise() -> None:
    router = _router(top_k=2, num_experts=2).train()
    with torch.no_grad():
        router.noise_weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -30.0]]))
    torch.manual_seed(123)
    r = router(X_TD)
    torch.manual_seed(123)
    noise_TE = torch.randn(2, 2)
    # noise scale: softplus(x W_noise^T) + eps; e1 of t1 has softplus(-60) ~ 0
    std_TE = torch.nn.functional.softplus(X_TD @ torch.tensor([[2.0, 0.0], [0.0, -30.0]]).t()) + NOISE_EPS
    want_logits = X_TD + noise_TE * std_TE
    assert torch.allclose(r.probs_TE, torch.softmax(want_logits, -1), atol=1e-6)


def test_noise_changes_routing_only_in_training() -> None:
    router = _router(num_experts=2)
    with torch.no_grad():
        router.noise_weight.fill_(5.0)  # huge noise
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).abs()
    router.eval()
    clean = router(x).topk_idx_TK
    assert torch.equal(clean, router(x).topk_idx_TK)
    router.train()
    torch.manual_seed(0)
    assert not torch.equal(clean, router(x).topk_idx_TK)


def test_load_estimator_matches_monte_carlo() -> None:
    # P(e stays in the top k when only its own noise is redrawn), checked by sampling.
    gen = torch.Generator().manual_seed(3)
    clean = torch.randn(3, 5, generator=gen)
    std = torch.rand(3, 5, generator=gen) + 0.3
    noisy = clean + torch.randn(3, 5, generator=gen) * std
    k = 2
    est = noisy_load(clean, noisy, std, k)
    n = 40000
    mc = torch.zeros(5)
    for e in range(5):
        draws = clean[:, e : e + 1] + torch.randn(3, n, generator=gen) * std[:, e : e + 1]
        others = torch.cat([noisy[:, :e], noisy[:, e + 1 :]], dim=1)
        kth_other = torch.topk(others, k, dim=1).values[:, k - 1 : k]
        mc[e] = (draws > kth_other).float().mean(1).sum()
    assert torch.allclose(est, mc, atol=0.03), (est, mc)


def test_top_k_equal_to_num_experts_has_full_load() -> None:
    clean = torch.randn(4, 3)
    est = noisy_load(clean, clean, torch.ones(4, 3), 3)
    assert torch.equal(est, torch.full((3,), 4.0))


def test_gradients_reach_gate_and_noise_weights() -> None:
    layer = MoELayer(MoEConfig(4, 6, 4, top_k=2, router="noisy_topk", aux_loss_coeff=0.1), seed=1)
    layer.train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = layer(x)
    (out.output.sum() + out.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.router.noise_weight.grad.abs().sum() > 0  # through noise and load loss


def test_balanced_routing_has_zero_loss_and_zero_tokens_are_finite() -> None:
    r = _router(num_experts=2, top_k=1).eval()
    # mirror-symmetric tokens: importance and load are equal across the 2 experts
    out = r(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out.lb_loss.item() == pytest.approx(0.0, abs=1e-10)
    empty = r(torch.zeros(0, 2))
    assert empty.lb_loss.item() == 0.0 and torch.isfinite(empty.aux_loss)


def test_eval_routing_equals_softmax_topk() -> None:
    cfg = dict(hidden_size=6, ffn_hidden_size=5, num_experts=4, top_k=2)
    a = MoELayer(MoEConfig(**cfg), seed=2).eval()
    b = MoELayer(MoEConfig(**cfg, router="noisy_topk"), seed=2).eval()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(4))
    oa, ob = a(x), b(x)
    assert torch.equal(oa.output, ob.output)
    assert torch.equal(oa.stats.routed_E, ob.stats.routed_E)


def test_global_state_dict_carries_noise_weight() -> None:
    layer = MoELayer(MoEConfig(4, 6, 4, router="noisy_topk"), seed=2)
    with torch.no_grad():
        layer.router.noise_weight.fill_(0.5)
    sd = layer.global_state_dict()
    assert torch.equal(sd["router.noise_weight"], torch.full((4, 4), 0.5))
    other = MoELayer(MoEConfig(4, 6, 4, router="noisy_topk"), seed=9)
    other.load_global_state_dict(sd)
    assert torch.equal(other.router.noise_weight, layer.router.noise_weight)
