"""Capacity and drop decisions against hand-derived cases, both policies, k = 1, 2, 3.

Notation in the derivations: ``(t, c)`` is token t's c-th choice; "pos" is its
position-priority index ``c * T + t`` (every first choice before any second choice,
earlier tokens first within a choice). An expert keeps the first C pairs in priority
order among the pairs routed to it.
"""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.capacity import plan_capacity, positions_in_expert

T, F = True, False


def plan(idx: list, weights: list | None, experts: int, capacity: int | None, policy: str,
         valid: list | None = None):
    idx_TK = torch.tensor(idx, dtype=torch.int64)
    w_TK = torch.tensor(weights, dtype=torch.float32) if weights is not None else torch.ones(idx_TK.shape)
    valid_TK = torch.tensor(valid, dtype=torch.bool) if valid is not None else None
    return plan_capacity(idx_TK, w_TK, experts, capacity, policy, valid_TK)


def check(p, kept: list, routed: list, kept_E: list, capacity: int | None) -> None:
    assert p.kept_TK.dtype == torch.bool
    assert p.kept_TK.tolist() == kept
    assert p.routed_E.tolist() == routed
    assert p.kept_E.tolist() == kept_E
    assert p.capacity == capacity


# ---------------------------------------------------------------------------- k = 1
# 5 tokens, 3 experts, capacity 2.  idx = [0, 0, 1, 0, 0]
# routed: e0 <- t0, t1, t3, t4 (4); e1 <- t2 (1); e2 <- none.
IDX_K1 = [[0], [0], [1], [0], [0]]
W_K1 = [[0.1], [0.9], [0.5], [0.7], [0.7]]


def test_k1_position() -> None:
    # e0 keeps the two earliest tokens t0, t1; t3 and t4 are dropped.
    check(plan(IDX_K1, W_K1, 3, 2, "position"),
          kept=[[T], [T], [T], [F], [F]], routed=[4, 1, 0], kept_E=[2, 1, 0], capacity=2)


def test_k1_probs() -> None:
    # e0 candidates by weight: t1 0.9, then t3 0.7 and t4 0.7 tied (t3 wins: earlier
    # position), then t0 0.1.  Keep t1, t3.
    check(plan(IDX_K1, W_K1, 3, 2, "probs"),
          kept=[[F], [T], [T], [T], [F]], routed=[4, 1, 0], kept_E=[2, 1, 0], capacity=2)


# ---------------------------------------------------------------------------- k = 2
# 5 tokens, 3 experts, capacity 2.
#   t0: (0, 1)   t1: (0, 1)   t2: (1, 2)   t3: (1, 0)   t4: (2, 1)
# routed: e0 <- (t0,0) (t1,0) (t3,1)                    = 3
#         e1 <- (t0,1) (t1,1) (t2,0) (t3,0) (t4,1)      = 5
#         e2 <- (t2,1) (t4,0)                           = 2
IDX_K2 = [[0, 1], [0, 1], [1, 2], [1, 0], [2, 1]]


def test_k2_position_gshard_priority() -> None:
    # First choices in token order:  t0->e0 (1/2)  t1->e0 (2/2)  t2->e1 (1/2)
    #                                t3->e1 (2/2)  t4->e2 (1/2)       all kept
    # Second choices in token order: t0->e1 full, t1->e1 full, t2->e2 (2/2) kept,
    #                                t3->e0 full, t4->e1 full
    # A token-major order would have kept (t0,1) on e1 and dropped t3's FIRST choice;
    # GShard priority keeps every token's first choice first.
    check(plan(IDX_K2, None, 3, 2, "position"),
          kept=[[T, F], [T, F], [T, T], [T, F], [T, F]],
          routed=[3, 5, 2], kept_E=[2, 2, 2], capacity=2)


def test_k2_probs() -> None:
    w = [[0.6, 0.4], [0.5, 0.5], [0.5, 0.2], [0.3, 0.2], [0.4, 0.4]]
    # e0: (t0,0) .6, (t1,0) .5, (t3,1) .2                -> keep (t0,0) (t1,0)
    # e1: (t2,0) .5 pos 2, (t1,1) .5 pos 6 (tie: pos 2 first), (t0,1) .4, (t4,1) .4,
    #     (t3,0) .3                                      -> keep (t2,0) (t1,1)
    # e2: (t4,0) .4, (t2,1) .2                           -> keep both
    # Here t3 loses everything (its first choice is weak), unlike under "position".
    check(plan(IDX_K2, w, 3, 2, "probs"),
          kept=[[T, F], [T, T], [T, T], [F, F], [T, F]],
          routed=[3, 5, 2], kept_E=[2, 2, 2], capacity=2)


def test_k2_probs_all_ties_equals_position() -> None:
    # Equal weights everywhere: ties fall back to position priority.
    same = plan(IDX_K2, [[0.5, 0.5]] * 5, 3, 2, "probs")
    assert same.kept_TK.tolist() == plan(IDX_K2, None, 3, 2, "position").kept_TK.tolist()


# ---------------------------------------------------------------------------- k = 3
# 4 tokens, 4 experts, capacity 2.
#   t0: (0, 1, 2)   t1: (0, 2, 3)   t2: (1, 0, 3)   t3: (0, 1, 2)
# routed: e0 <- (t0,0) (t1,0) (t2,1) (t3,0) = 4;  e1 <- (t0,1) (t2,0) (t3,1) = 3
#         e2 <- (t0,2) (t1,1) (t3,2)        = 3;  e3 <- (t1,2) (t2,2)        = 2
IDX_K3 = [[0, 1, 2], [0, 2, 3], [1, 0, 3], [0, 1, 2]]


def test_k3_position() -> None:
    # choice 0: t0->e0 (1), t1->e0 (2), t2->e1 (1), t3->e0 full
    # choice 1: t0->e1 (2), t1->e2 (1), t2->e0 full, t3->e1 full
    # choice 2: t0->e2 (2), t1->e3 (1), t2->e3 (2), t3->e2 full
    check(plan(IDX_K3, None, 4, 2, "position"),
          kept=[[T, T, T], [T, T, T], [T, F, T], [F, F, F]],
          routed=[4, 3, 3, 2], kept_E=[2, 2, 2, 2], capacity=2)


def test_k3_probs() -> None:
    w = [[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]]
    # e0: (t3,0) .7, (t0,0) .5, (t1,0) .4, (t2,1) .3 -> keep (t3,0) (t0,0)
    # e1: (t2,0) .6, (t0,1) .3, (t3,1) .2            -> keep (t2,0) (t0,1)
    # e2: (t1,1) .35, (t0,2) .2, (t3,2) .1           -> keep (t1,1) (t0,2)
    # e3: (t1,2) .25, (t2,2) .1                      -> keep both
    check(plan(IDX_K3, w, 4, 2, "probs"),
          kept=[[T, T, T], [F, T, T], [T, F, T], [T, F, F]],
          routed=[4, 3, 3, 2], kept_E=[2, 2, 2, 2], capacity=2)


def test_k3_capacity_1_position() -> None:
    # C=1: each expert keeps only its highest-priority pair.
    # e0 <- (t0,0); e1 <- (t2,0) (pos 2 beats (t0,1) pos 4); e2 <- (t1,1) (pos 5 beats
    # (t0,2) pos 8); e3 <- (t1,2) (pos 9 beats (t2,2) pos 10).
    check(plan(IDX_K3, None, 4, 1, "position"),
          kept=[[T, F, F], [F, T, T], [T, F, F], [F, F, F]],
          routed=[4, 3, 3, 2], kept_E=[1, 1, 1, 1], capacity=1)


# ------------------------------------------------------------------ edge capacities
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_dropless_keeps_everything(policy: str) -> None:
    p = plan(IDX_K3, None, 4, None, policy)
    check(p, kept=[[T, T, T]] * 4, routed=[4, 3, 3, 2], kept_E=[4, 3, 3, 2], capacity=None)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_at_demand_keeps_everything(policy: str) -> None:
    # max demand is 5 (e1): C=5 drops nothing, C=4 drops exactly one pair on e1.
    assert plan(IDX_K2, None, 3, 5, policy).kept_TK.all()
    p = plan(IDX_K2, None, 3, 4, policy)
    assert p.kept_E.tolist() == [3, 4, 2]
    assert int((~p.kept_TK).sum()) == 1


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_zero_keeps_nothing(policy: str) -> None:
    p = plan(IDX_K2, [[0.6, 0.4]] * 5, 3, 0, policy)
    check(p, kept=[[F, F]] * 5, routed=[3, 5, 2], kept_E=[0, 0, 0], capacity=0)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_zero_tokens(policy: str) -> None:
    p = plan_capacity(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), 3, 2, policy)
    assert p.kept_TK.shape == (0, 2)
    assert p.routed_E.tolist() == [0, 0, 0] and p.kept_E.tolist() == [0, 0, 0]


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match=r"drop_policy must be 'position' or 'probs', got 'random'"):
        plan(IDX_K2, None, 3, 2, "random")


# ----------------------------------------------------------------------- valid_TK
def test_valid_mask_position() -> None:
    # t0: (0, [1])  t1: (0, 2)  t2: (1, [0])   -- bracketed slots are invalid
    # routed: e0 <- (t0,0) (t1,0); e1 <- (t2,0); e2 <- (t1,1). Invalid slots count nowhere.
    # C=1: choice 0: t0->e0 kept, t1->e0 full, t2->e1 kept; choice 1: t1->e2 kept.
    idx = [[0, 1], [0, 2], [1, 0]]
    valid = [[T, F], [T, T], [T, F]]
    check(plan(idx, None, 3, 1, "position", valid),
          kept=[[T, F], [F, T], [T, F]], routed=[2, 1, 1], kept_E=[1, 1, 1], capacity=1)
    # Dropless: kept is exactly the valid mask.
    check(plan(idx, None, 3, None, "position", valid),
          kept=valid, routed=[2, 1, 1], kept_E=[2, 1, 1], capacity=None)


def test_valid_mask_invalid_slots_take_no_slot_probs() -> None:
    # An invalid slot with a huge weight on e0 must not take e0's only slot.
    idx = [[0, 0], [1, 0]]
    w = [[0.2, 0.99], [0.5, 0.4]]
    valid = [[T, F], [T, T]]
    # valid e0 pairs: (t0,0) .2, (t1,1) .4 -> probs keeps (t1,1).
    check(plan(idx, w, 2, 1, "probs", valid),
          kept=[[F, F], [T, T]], routed=[2, 1], kept_E=[1, 1], capacity=1)


# ----------------------------------------------------------- positions_in_expert
def test_positions_in_expert_hand_case() -> None:
    # experts in priority order [2, 0, 2, 1, 0, 3(sentinel for E=3)]
    # -> rank within own expert  [0, 0, 1, 0, 1, 0]
    pos = positions_in_expert(torch.tensor([2, 0, 2, 1, 0, 3]), 3)
    assert pos.tolist() == [0, 0, 1, 0, 1, 0]


# ----------------------------------------------------- through the layer: all dropped
def test_layer_token_with_all_choices_dropped_returns_zero() -> None:
    # Gate row 0 dominates for positive inputs, row 1 second: every token picks
    # (e0, e1). T=6, k=2, E=4, cf=1: C = ceil(6*2/4) = 3, so e0 keeps t0..t2 (first
    # choices), e1 keeps t0..t2 (second choices), t3..t5 lose both choices.
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=8, num_experts=4, top_k=2,
                    capacity_factor=1.0, min_capacity=0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(2.0)
        layer.router.weight[1].fill_(1.0)
    x = torch.rand(6, 4) + 0.5
    out = layer(x)
    st = out.stats
    assert st.routed_E.tolist() == [6, 6, 0, 0]
    assert st.kept_E.tolist() == [3, 3, 0, 0]
    assert st.dropped_E.tolist() == [3, 3, 0, 0]
    assert st.capacity_E.tolist() == [3, 3, 3, 3]
    assert int(st.tokens_all_dropped) == 3
    assert torch.equal(out.output[3:], torch.zeros(3, 4))
    assert (out.output[:3].abs().sum(-1) > 0).all()
