"""Hand-checked math of today's MoE options: scoring rules, group-limited routing,
routed scaling, shared experts, the balancing-loss scopes, the router dtype, and the
errors for every invalid combination."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.balance import GlobalLoad, load_balancing_loss
from expert_parallel.moe.router import Router
from expert_parallel.moe.scoring import select_topk

BASE: dict[str, Any] = dict(hidden_size=4, ffn_hidden_size=4, num_experts=8)


def cfg(**kw: Any) -> MoEConfig:
    return MoEConfig(**{**BASE, **kw})


def router_with(weight_ED: torch.Tensor, **kw: Any) -> Router:
    r = Router(cfg(**{**kw, "num_experts": weight_ED.shape[0], "hidden_size": weight_ED.shape[1]}))
    with torch.no_grad():
        r.weight.copy_(weight_ED)
    return r


# ---------------------------------------------------------------- scoring rules
def test_topk_softmax_is_a_softmax_over_the_selected_logits() -> None:
    x = torch.eye(4)[:2]  # token t's logits = column t of W [E=4, D=4]
    w = torch.zeros(4, 4)
    w[:, 0] = torch.tensor([1.0, 3.0, 2.0, 0.5])
    w[:, 1] = torch.tensor([0.0, -1.0, 0.2, 0.1])
    r = router_with(w, router="topk_softmax", top_k=2)
    out = r(x)
    # token 0's logits are (1, 3, 2, 0.5): top-2 = experts 1, 2; weights softmax(3, 2).
    assert out.topk_idx_TK[0].tolist() == [1, 2]
    want = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(out.topk_weight_TK[0], want)
    # Mixtral's softmax -> top-k -> renormalise is the same function.
    mix = router_with(w, router="softmax_topk", top_k=2)(x)
    torch.testing.assert_close(mix.topk_weight_TK, out.topk_weight_TK)


def test_deepseek_scoring_normalises_then_scales() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    x = torch.randn(5, 4)
    r = router_with(w, router="sigmoid_topk", top_k=3, routed_scaling_factor=2.5)
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-1, 1, 8))
    out = r(x)
    scores = torch.sigmoid(x @ w.t())
    idx = torch.topk(scores + r.expert_bias, 3, dim=-1).indices  # bias picks ...
    assert torch.equal(out.topk_idx_TK, idx)
    chosen = scores.gather(-1, idx)  # ... the unbiased scores weigh
    torch.testing.assert_close(out.topk_weight_TK, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.full((5,), 2.5))


def test_router_dtype_fp64_keeps_logits_and_weights_in_fp64() -> None:
    r = Router(cfg(router_dtype="fp64"))
    out = r(torch.randn(6, 4))
    assert out.topk_weight_TK.dtype == torch.float64 and out.probs_TE.dtype == torch.float64
    layer = MoELayer(cfg(router_dtype="fp64"))
    assert layer(torch.randn(6, 4)).output.dtype == torch.float32  # the input's dtype


# ---------------------------------------------------------- group-limited routing
def test_group_score_is_the_sum_of_the_two_best_experts() -> None:
    # 2 groups of 4. Group 0 has one very high score (0.9) and low others; group 1 has
    # two good ones (0.6, 0.5): sums of top-2 are 1.0 vs 1.1, so group 1 wins.
    s = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.6, 0.5, 0.0, 0.0]])
    c = cfg(num_groups=2, topk_groups=1, top_k=2)
    assert sorted(select_topk(s, c)[0].tolist()) == [4, 5]
    # Unrestricted top-2 would have taken expert 0.
    assert 0 in select_topk(s, cfg(top_k=2))[0].tolist()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(groups=st.sampled_from([2, 4, 8]), data=st.data())
def test_group_limited_routing_never_leaves_the_chosen_groups(groups: int, data: Any) -> None:
    per_group = 16 // groups
    topk_groups = data.draw(st.integers(1, groups))
    top_k = data.draw(st.integers(1, min(6, topk_groups * per_group)))
    router = data.draw(st.sampled_from(["softmax_topk", "sigmoid_topk", "topk_softmax"]))
    seed = data.draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    r = Router(cfg(num_experts=16, top_k=top_k, router=router, num_groups=groups, topk_groups=topk_groups,
                   init_std=1.0))
    x = torch.randn(32, 4)
    out = r(x)
    logits = x @ r.weight.t()
    select = {"softmax_topk": torch.softmax(logits, -1), "sigmoid_topk": torch.sigmoid(logits),
              "topk_softmax": logits}[router]
    group_score = select.view(32, groups, per_group).topk(min(2, per_group), -1).values.sum(-1)
    chosen = torch.topk(group_score, topk_groups, -1).indices
    for t in range(32):
        used = {int(e) // per_group for e in out.topk_idx_TK[t]}
        assert used <= set(chosen[t].tolist()), (t, used, chosen[t])
        assert len(set(out.topk_idx_TK[t].tolist())) == top_k  # k distinct experts


# ---------------------------------------------------------------- balancing losses
def test_sequence_loss_by_hand() -> None:
    # 2 sequences of 2 tokens, 2 experts, top-1. Sequence 0 sends both tokens to expert 0,
    # sequence 1 one to each. P per sequence is the mean of its rows.
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    idx = torch.tensor([[0], [0], [1], [0]])
    seq = load_balancing_loss(probs, idx, num_sequences=2)
    l0 = 2 * (1.0 * 0.7 + 0.0 * 0.3)
    l1 = 2 * (0.5 * 0.6 + 0.5 * 0.4)
    assert math.isclose(float(seq), (l0 + l1) / 2, rel_tol=1e-6)
    micro = load_balancing_loss(probs, idx)
    assert math.isclose(float(micro), 2 * (0.75 * 0.65 + 0.25 * 0.35), rel_tol=1e-6)


def test_global_load_in_one_process_is_the_micro_batch_loss() -> None:
    probs = torch.softmax(torch.randn(6, 4), -1)
    idx = torch.topk(probs, 2, -1).indices
    f, scale = GlobalLoad(None, 1).reduce(torch.bincount(idx.reshape(-1), minlength=4), 6)
    assert float(scale) == 1.0
    torch.testing.assert_close(load_balancing_loss(probs, idx, global_f_E=f), load_balancing_loss(probs, idx))


def test_global_load_accumulates_over_micro_batches_after_start() -> None:
    tracker = GlobalLoad(None, 1)
    tracker.start()
    f1, _ = tracker.reduce(torch.tensor([4, 0]), 4)
    f2, _ = tracker.reduce(torch.tensor([0, 4]), 4)
    assert f1.tolist() == [1.0, 0.0] and f2.tolist() == [0.5, 0.5]
    tracker.start()  # the next step starts afresh
    assert tracker.reduce(torch.tensor([0, 2]), 2)[0].tolist() == [0.0, 1.0]


def test_shared_expert_output_is_added_and_gated() -> None:
    torch.manual_seed(0)
    c = cfg(num_shared_experts=1, shared_expert_gate=True)
    layer = MoELayer(c)
    plain = MoELayer(cfg())
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    x = torch.randn(5, 4)
    s = layer.shared
    h = torch.nn.functional.silu(x @ s.w1_DF) * (x @ s.w3_DF)
    want = plain(x).output + (h @ s.w2_FD) * torch.sigmoid(x @ s.gate_D).unsqueeze(-1)
    torch.testing.assert_close(layer(x).output, want)
    # overlap on or off: the same function
    off = MoELayer(c.replace(shared_expert_overlap=False))
    off.load_state_dict(layer.state_dict())
    torch.testing.assert_close(off(x).output, layer(x).output)


# ---------------------------------------------------------------- bad input
BAD = [
    (dict(num_groups=3), ValueError, "num_groups=3 must divide num_experts=8"),
    (dict(num_groups=4), ValueError, "topk_groups must be set when num_groups=4 > 1, got None"),
    (dict(num_groups=4, topk_groups=5), ValueError, "topk_groups=5 must be <= num_groups=4"),
    (dict(num_groups=4, topk_groups=1, top_k=3), ValueError,
     "top_k=3 is larger than the 2 experts in topk_groups=1 groups of 2"),
    (dict(topk_groups=2), ValueError, "topk_groups=2 is only used with num_groups > 1, got num_groups=1"),
    (dict(num_groups=2, topk_groups=1, router="top_p", top_p=0.5), ValueError,
     "num_groups=2 (group-limited routing) needs router in"),
    (dict(shared_expert_gate=True), ValueError,
     "shared_expert_gate=True needs num_shared_experts >= 1, got num_shared_experts=0"),
    (dict(shared_expert_ffn_hidden=8), ValueError,
     "shared_expert_ffn_hidden=8 needs num_shared_experts >= 1, got num_shared_experts=0"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts must be >= 0, got -1"),
    (dict(aux_loss_scope="batch"), ValueError, "aux_loss_scope must be one of"),
    (dict(aux_loss_scope="sequence", router="noisy_topk"), ValueError,
     "aux_loss_scope='sequence' cannot be combined with router='noisy_topk'"),
    (dict(router_dtype="bf16"), ValueError, "router_dtype must be one of ['fp32', 'fp64'], got 'bf16'"),
    (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor must be finite and > 0"),
    (dict(shared_expert_gate=1, num_shared_experts=1), TypeError, "shared_expert_gate must be a bool, got 1"),
]


@pytest.mark.parametrize("kw,exc,message", BAD, ids=[str(b[0]) for b in BAD])
def test_invalid_combinations_are_named(kw: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        cfg(**kw)


def test_sequence_scope_without_a_sequence_shape() -> None:
    layer = MoELayer(cfg(aux_loss_scope="sequence"), name="layers.0.ffn")
    with pytest.raises(ValueError, match=re.escape(
            "layers.0.ffn: aux_loss_scope='sequence' needs a [batch, seq, hidden] input")):
        layer(torch.randn(6, 4))
    assert layer(torch.randn(2, 3, 4)).output.shape == (2, 3, 4)
