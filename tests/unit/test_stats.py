"""MoEStats from a real forward on a hand-controlled routing, accumulation and the
host-side summary."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, MoEStats


def _layer() -> MoELayer:
    # E=4, top-2, cf=1, min_capacity 0. Positive inputs; gate rows 0 > 1 > others, so every
    # token routes to (e0, e1). T=6: C = ceil(6*2/4) = 3.
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=8, num_experts=4, top_k=2,
                    capacity_factor=1.0, min_capacity=0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(2.0)
        layer.router.weight[1].fill_(1.0)
    return layer


def test_stats_hand_case_and_summary() -> None:
    st = _layer()(torch.rand(6, 4) + 0.5).stats
    assert st.routed_E.tolist() == [6, 6, 0, 0]
    assert st.kept_E.tolist() == [3, 3, 0, 0]
    assert st.dropped_E.tolist() == [3, 3, 0, 0]
    assert st.capacity_E.tolist() == [3, 3, 3, 3]
    assert int(st.num_tokens) == 6 and int(st.num_ranks) == 1
    assert int(st.tokens_all_dropped) == 3
    assert st.experts_per_token.tolist() == [0, 0, 6]  # every token chose exactly 2
    assert st.drop_fraction == pytest.approx(6 / 12)
    # kept [3, 3, 0, 0]: max 3 / mean 1.5
    assert st.load_imbalance() == pytest.approx(2.0)
    d = st.to_dict()
    assert d["routed"] == [6, 6, 0, 0] and d["dropped"] == [3, 3, 0, 0]
    assert d["drop_fraction"] == pytest.approx(0.5) and d["tokens_all_dropped"] == 3
    assert d["experts_per_token_mean"] == pytest.approx(2.0)
    assert st.reduce(None) is st  # single process: no-op


def test_accumulate_sums_every_field() -> None:
    layer = _layer()
    a = layer(torch.rand(6, 4) + 0.5).stats
    b = layer(torch.rand(2, 4) + 0.5).stats  # T=2: C = 1; routed [2,2], kept [1,1]
    assert b.kept_E.tolist() == [1, 1, 0, 0]
    total = MoEStats.accumulate([a, b])
    assert total.routed_E.tolist() == [8, 8, 0, 0]
    assert total.kept_E.tolist() == [4, 4, 0, 0]
    assert total.dropped_E.tolist() == [4, 4, 0, 0]
    assert total.capacity_E.tolist() == [4, 4, 4, 4]
    assert int(total.num_tokens) == 8 and int(total.tokens_all_dropped) == 4
    assert total.routed_E.dtype == torch.int64 and total.lb_loss.dtype == torch.float32
    torch.testing.assert_close(total.lb_loss, a.lb_loss + b.lb_loss)


def test_dropless_stats() -> None:
    layer = MoELayer(MoEConfig(hidden_size=4, ffn_hidden_size=8, num_experts=4, top_k=3))
    st = layer(torch.randn(5, 4)).stats
    assert int(st.routed_E.sum()) == 15
    assert torch.equal(st.kept_E, st.routed_E) and int(st.dropped_E.sum()) == 0
    assert torch.equal(st.capacity_E, st.routed_E)
    assert int(st.tokens_all_dropped) == 0 and st.drop_fraction == 0.0
