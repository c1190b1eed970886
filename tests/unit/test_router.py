"""Router math against hand-computed values.

The fixture picks a gate weight and inputs whose logits are logarithms of small
integers, so softmax / sigmoid probabilities are simple fractions:

    W_ED = [[1, 0],          x_TD = [[ln 2,   ln 3  ],     logits = x @ W^T
            [0, 1],                  [ln 4,   ln 1/2],
            [1, 1]]                  [ln 1/3, ln 2  ]]

    exp(logits_TE) = [[2,   3,   6  ],     row sums 11, 13/2, 3
                      [4,   1/2, 2  ],
                      [1/3, 2,   2/3]]

    softmax probs  = [[2/11, 3/11, 6/11],
                      [8/13, 1/13, 4/13],
                      [1/9,  6/9,  2/9 ]]
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.balance import load_balancing_loss, z_loss
from expert_parallel.moe.router import Router

LN = math.log
W_ED = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
X_TD = torch.tensor([[LN(2), LN(3)], [LN(4), LN(0.5)], [LN(1 / 3), LN(2)]])
EXP_LOGITS = [[2, 3, 6], [4, 0.5, 2], [1 / 3, 2, 2 / 3]]
PROBS = [[2 / 11, 3 / 11, 6 / 11], [8 / 13, 1 / 13, 4 / 13], [1 / 9, 6 / 9, 2 / 9]]
ATOL = 1e-6


def make_router(weight_ED: torch.Tensor = W_ED, **changes: Any) -> Router:
    fields: dict[str, Any] = dict(hidden_size=weight_ED.shape[1], ffn_hidden_size=4,
                                  num_experts=weight_ED.shape[0], top_k=2)
    fields.update(changes)
    router = Router(MoEConfig(**fields))
    with torch.no_grad():
        router.weight.copy_(weight_ED)
    return router


def close(actual: torch.Tensor, expected: Any, atol: float = ATOL) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected_t.shape, (actual.shape, expected_t.shape)
    diff = (actual.double() - expected_t).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff}\nactual={actual}\nexpected={expected_t}"


# -------------------------------------------------------------------- softmax top-k
def test_logits_and_softmax_probs() -> None:
    router = make_router()
    close(router.logits(X_TD), [[math.log(v) for v in row] for row in EXP_LOGITS])
    r = router(X_TD)
    close(r.probs_TE, PROBS)
    assert r.probs_TE.dtype == torch.float32


def test_top2_renormalised() -> None:
    r = make_router(top_k=2, normalize_topk=True)(X_TD)
    # t0: top-2 of [2,3,6]/11 is experts (2, 1) with (6, 3)/11 -> renormalised (2/3, 1/3)
    # t1: top-2 of [8,1,4]/13 is experts (0, 2) with (8, 4)/13 -> (2/3, 1/3)
    # t2: top-2 of [1,6,2]/9  is experts (1, 2) with (6, 2)/9  -> (3/4, 1/4)
    assert r.topk_idx_TK.tolist() == [[2, 1], [0, 2], [1, 2]]
    assert r.topk_idx_TK.dtype == torch.int64
    close(r.topk_weight_TK, [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [3 / 4, 1 / 4]])
    close(r.topk_weight_TK.sum(-1), [1.0, 1.0, 1.0])


def test_top2_raw_weights_without_renormalisation() -> None:
    r = make_router(top_k=2, normalize_topk=False)(X_TD)
    assert r.topk_idx_TK.tolist() == [[2, 1], [0, 2], [1, 2]]
    close(r.topk_weight_TK, [[6 / 11, 3 / 11], [8 / 13, 4 / 13], [6 / 9, 2 / 9]])


def test_top3_is_all_experts_sorted() -> None:
    r = make_router(top_k=3, normalize_topk=True)(X_TD)
    assert r.topk_idx_TK.tolist() == [[2, 1, 0], [0, 2, 1], [1, 2, 0]]
    # all three renormalised = the full softmax, in descending order
    close(r.topk_weight_TK, [[6 / 11, 3 / 11, 2 / 11], [8 / 13, 4 / 13, 1 / 13], [6 / 9, 2 / 9, 1 / 9]])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("router_name", ["softmax_topk", "switch"])
def test_top1_keeps_raw_gate_probability(normalize: bool, router_name: str) -> None:
    # normalize_topk is ignored for top-1: renormalising would make every weight 1.
    r = make_router(top_k=1, router=router_name, normalize_topk=normalize)(X_TD)
    assert r.topk_idx_TK.tolist() == [[2], [0], [1]]
    close(r.topk_weight_TK, [[6 / 11], [8 / 13], [6 / 9]])


def test_top1_weight_carries_router_gradient() -> None:
    router = make_router(top_k=1, router="switch")
    r = router(X_TD)
    r.topk_weight_TK.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.expert_bias.grad is None  # a buffer, never trained by autograd


# ------------------------------------------------------------------------ losses
def _hand_lb(idx: list[list[int]], probs: list[list[float]]) -> float:
    num_experts = len(probs[0])
    pairs = [e for row in idx for e in row]
    f = [Fraction(pairs.count(e), len(pairs)) for e in range(num_experts)]
    p = [sum(row[e] for row in probs) / len(probs) for e in range(num_experts)]
    return num_experts * sum(float(f[e]) * p[e] for e in range(num_experts))


def test_load_balancing_loss_hand_computed() -> None:
    r = make_router(top_k=2, aux_loss_coeff=1.0)(X_TD)
    # Pairs: e0 once (t1), e1 twice (t0, t2), e2 three times -> f = (1, 2, 3) / 6.
    # P_e = column means of PROBS. lb = 3 * sum_e f_e P_e.
    p = [sum(row[e] for row in PROBS) / 3 for e in range(3)]
    expected = 3 * (1 / 6 * p[0] + 2 / 6 * p[1] + 3 / 6 * p[2])
    assert expected == pytest.approx(_hand_lb([[2, 1], [0, 2], [1, 2]], PROBS))
    close(r.lb_loss, expected)


def test_load_balancing_loss_uniform_router_is_one() -> None:
    # Zero gate: every probability is 1/E, so sum_e f_e / E = 1/E and lb = 1 whatever
    # the tie-breaking of top-k did with f.
    for k in (1, 2, 4):
        router = make_router(torch.zeros(4, 3), top_k=k)
        close(router(torch.randn(7, 3)).lb_loss, 1.0)


def test_load_balancing_loss_all_to_one_expert_is_E() -> None:
    num_experts = 5
    probs_TE = torch.zeros(6, num_experts)
    probs_TE[:, 3] = 1.0
    idx_TK = torch.full((6, 1), 3)
    close(load_balancing_loss(probs_TE, idx_TK), float(num_experts))
    # Balanced demand and uniform probabilities: exactly 1.
    probs_TE = torch.full((5, num_experts), 1.0 / num_experts)
    close(load_balancing_loss(probs_TE, torch.arange(5).view(5, 1)), 1.0)


def test_load_balancing_loss_gradient_is_E_f_over_T() -> None:
    # d lb / d probs[t, e] = E * f_e / T  (f is a count, not differentiable)
    probs_TE = torch.tensor(PROBS, requires_grad=True)
    idx_TK = torch.tensor([[2, 1], [0, 2], [1, 2]])
    load_balancing_loss(probs_TE, idx_TK).backward()
    f = [1 / 6, 2 / 6, 3 / 6]
    close(probs_TE.grad, [[3 * fe / 3 for fe in f]] * 3)


def test_z_loss_hand_computed() -> None:
    r = make_router(z_loss_coeff=1.0)(X_TD)
    # logsumexp per token = ln(row sum of exp(logits)) = ln 11, ln 6.5, ln 3
    expected = (LN(11) ** 2 + LN(6.5) ** 2 + LN(3) ** 2) / 3
    close(r.z_loss, expected)
    close(z_loss(torch.zeros(4, 8)), LN(8) ** 2)


@pytest.mark.parametrize("aux,z", [(0.0, 0.0), (0.01, 0.0), (0.0, 1e-3), (0.1, 0.5)])
def test_aux_loss_applies_coefficients(aux: float, z: float) -> None:
    r = make_router(aux_loss_coeff=aux, z_loss_coeff=z)(X_TD)
    lb = _hand_lb([[2, 1], [0, 2], [1, 2]], PROBS)
    zl = (LN(11) ** 2 + LN(6.5) ** 2 + LN(3) ** 2) / 3
    close(r.aux_loss, aux * lb + z * zl)
    assert r.aux_loss.dim() == 0 and r.aux_loss.dtype == torch.float32
    # logged values are unscaled and detached
    close(r.lb_loss, lb)
    close(r.z_loss, zl)
    assert not r.lb_loss.requires_grad and not r.z_loss.requires_grad


def test_aux_loss_gradient_reaches_router() -> None:
    router = make_router(aux_loss_coeff=1.0, z_loss_coeff=1.0)
    router(X_TD).aux_loss.backward()
    assert router.weight.grad.abs().sum() > 0


def test_zero_tokens() -> None:
    r = make_router(aux_loss_coeff=1.0, z_loss_coeff=1.0)(torch.zeros(0, 2))
    assert r.topk_idx_TK.shape == (0, 2) and r.topk_weight_TK.shape == (0, 2)
    close(r.aux_loss, 0.0)
    close(r.lb_loss, 0.0)


def test_nonfinite_flag() -> None:
    router = make_router()
    assert int(router(X_TD).nonfinite) == 0
    x = X_TD.clone()
    x[1, 0] = float("nan")
    assert int(router(x).nonfinite) == 1


# ------------------------------------------------------------------------ sigmoid
# sigmoid(ln p) = p / (1 + p):
SIGMOID = [[2 / 3, 3 / 4, 6 / 7], [4 / 5, 1 / 3, 2 / 3], [1 / 4, 2 / 3, 2 / 5]]


def test_sigmoid_router_scores_and_selection() -> None:
    r = make_router(router="sigmoid_topk", top_k=2, normalize_topk=False)(X_TD)
    # t0: [2/3, 3/4, 6/7] -> (2, 1); t1: [4/5, 1/3, 2/3] -> (0, 2); t2: [1/4, 2/3, 2/5] -> (1, 2)
    assert r.topk_idx_TK.tolist() == [[2, 1], [0, 2], [1, 2]]
    close(r.topk_weight_TK, [[6 / 7, 3 / 4], [4 / 5, 2 / 3], [2 / 3, 2 / 5]])
    # probs for the losses: scores normalised per token
    close(r.probs_TE, [[s / sum(row) for s in row] for row in SIGMOID])


def test_sigmoid_router_normalised() -> None:
    r = make_router(router="sigmoid_topk", top_k=2, normalize_topk=True)(X_TD)
    raw = [[6 / 7, 3 / 4], [4 / 5, 2 / 3], [2 / 3, 2 / 5]]
    close(r.topk_weight_TK, [[a / (a + b), b / (a + b)] for a, b in raw])


def test_sigmoid_bias_changes_selection_not_weights() -> None:
    router = make_router(router="sigmoid_topk", top_k=2, normalize_topk=False)
    router.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    r = router(X_TD)
    # Selection uses score + bias: expert 0 now wins everywhere (scores < 1 < 1 + score).
    # t0: [5/3, 3/4, 6/7] -> (0, 2); t1: [9/5, 1/3, 2/3] -> (0, 2); t2: [5/4, 2/3, 2/5] -> (0, 1)
    assert r.topk_idx_TK.tolist() == [[0, 2], [0, 2], [0, 1]]
    # ... but the weights are the unbiased scores of the chosen experts.
    close(r.topk_weight_TK, [[2 / 3, 6 / 7], [4 / 5, 2 / 3], [1 / 4, 2 / 3]])
    # probs (for the balancing loss) do not see the bias either
    close(r.probs_TE, [[s / sum(row) for s in row] for row in SIGMOID])


def test_sigmoid_bias_selection_has_no_gradient_path() -> None:
    router = make_router(router="sigmoid_topk", top_k=1)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    r = router(X_TD)
    assert r.topk_idx_TK.view(-1).tolist() == [2, 2, 2]
    r.topk_weight_TK.sum().backward()
    assert router.expert_bias.grad is None
    assert router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------- dtypes
def test_router_math_in_fp32_for_bf16_input() -> None:
    router = make_router(torch.randn(4, 8), top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.1)
    x_bf16 = torch.randn(5, 8).to(torch.bfloat16)
    r = router(x_bf16)
    for t in (r.topk_weight_TK, r.probs_TE, r.aux_loss, r.lb_loss, r.z_loss):
        assert t.dtype == torch.float32
    # Same as running the router on the bf16 values upcast to fp32 by hand.
    ref = router(x_bf16.float())
    assert torch.equal(r.topk_idx_TK, ref.topk_idx_TK)
    close(r.topk_weight_TK, ref.topk_weight_TK.double(), atol=0.0)
    close(r.probs_TE, ref.probs_TE.double(), atol=0.0)


def test_router_math_in_fp32_with_bf16_weights_and_autocast() -> None:
    router = make_router(torch.randn(4, 8), top_k=2).to(torch.bfloat16)
    x = torch.randn(5, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.probs_TE.dtype == torch.float32 and r.topk_weight_TK.dtype == torch.float32
    logits_ref = x @ router.weight.float().t()  # fp32 matmul of the bf16-stored weight
    close(r.probs_TE, torch.softmax(logits_ref, -1).double(), atol=1e-6)


def test_layer_bf16_output_dtype_and_fp32_aux() -> None:
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg).to(torch.bfloat16)
    out = layer(torch.randn(6, 8, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16
    assert out.aux_loss.dtype == torch.float32


# ------------------------------------------------------------------------- jitter
def test_no_jitter_in_eval_or_when_zero() -> None:
    eye = torch.eye(3)
    x = torch.rand(16, 3) + 0.5
    jittery = make_router(eye, router_jitter=0.3)
    jittery.eval()
    assert torch.equal(jittery.logits(x), x)
    plain = make_router(eye, router_jitter=0.0)
    plain.train()
    assert torch.equal(plain.logits(x), x)


def test_jitter_in_training_is_bounded_multiplicative_noise() -> None:
    eps = 0.3
    router = make_router(torch.eye(3), router_jitter=eps)
    router.train()
    x = torch.rand(64, 3) + 0.5
    torch.manual_seed(0)
    ratio = router.logits(x) / x  # identity gate: logits = x * U(1-eps, 1+eps)
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    assert (ratio - 1).abs().max() > eps / 2  # it really is noisy
    assert ratio.std() > 0.05


# ------------------------------------------------------------------- bias updates
def test_update_bias_sign() -> None:
    router = make_router(router="sigmoid_topk", bias_update_rate=0.1)
    # mean load 2: overloaded expert 0 goes down, the others up.
    router.update_bias(torch.tensor([4, 1, 1]))
    close(router.expert_bias, [-0.1, 0.1, 0.1])
    router.update_bias(torch.tensor([3, 3, 0]))  # mean 2: [-, -, +]
    close(router.expert_bias, [-0.2, 0.0, 0.2])
    router.update_bias(torch.tensor([5, 5, 5]))  # balanced: no move
    close(router.expert_bias, [-0.2, 0.0, 0.2])


def test_update_bias_disabled_at_rate_zero() -> None:
    router = make_router(router="sigmoid_topk", bias_update_rate=0.0)
    router.update_bias(torch.tensor([9, 0, 0]))
    assert torch.equal(router.expert_bias, torch.zeros(3))


def test_layer_update_expert_bias_from_stats() -> None:
    cfg = MoEConfig(hidden_size=2, ffn_hidden_size=4, num_experts=3, top_k=1,
                    router="sigmoid_topk", bias_update_rate=0.05)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(W_ED)
    stats = layer(X_TD).stats
    # top-1 sigmoid: t0 -> 2, t1 -> 0, t2 -> 1: balanced, bias unchanged
    assert stats.routed_E.tolist() == [1, 1, 1]
    layer.update_expert_bias(stats)
    close(layer.router.expert_bias, [0.0, 0.0, 0.0])
    stats = layer(X_TD[[0, 0, 1]]).stats  # routed [1, 0, 2], mean 1
    assert stats.routed_E.tolist() == [1, 0, 2]
    layer.update_expert_bias(stats)
    close(layer.router.expert_bias, [0.0, 0.05, -0.05])
