"""Expert-collapse metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.metrics import (
    CollapseConfig,
    CollapseTracker,
    collapse_metrics,
    routing_entropy,
)
from expert_parallel.moe.stats import MoEStats
from expert_parallel.training.report import plot_collapse


def _stats(routed: list[int], tokens: int, entropy_sum: float, max_sum: float) -> MoEStats:
    r = torch.tensor(routed)
    z = torch.zeros((), dtype=torch.int64)
    return MoEStats(r, r, r * 0, r, torch.tensor(tokens), z, z, z.float(), z.float(), z + 1,
                    experts_per_token=torch.tensor([0, tokens]),
                    entropy_sum=torch.tensor(entropy_sum), max_prob_sum=torch.tensor(max_sum))


def test_routing_entropy_hand_values() -> None:
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert routing_entropy(p).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-6)


def test_layer_stats_carry_entropy_and_confidence_sums() -> None:
    # identity gate, x = log p: the router's probs are p (E = 2)
    layer = MoELayer(MoEConfig(2, 3, 2, top_k=1, router="switch"), seed=0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    probs = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]
    s = layer(torch.tensor(probs).log()).stats
    want_h = sum(-sum(q * math.log(q) for q in row) for row in probs)
    assert float(s.entropy_sum) == pytest.approx(want_h, abs=1e-5)
    assert float(s.max_prob_sum) == pytest.approx(0.5 + 0.9 + 0.8, abs=1e-6)
    d = s.to_dict()
    assert d["router_entropy"] == pytest.approx(want_h / 3, abs=1e-5)
    assert d["router_confidence"] == pytest.approx(2.2 / 3, abs=1e-6)


def test_collapse_metrics_single_step() -> None:
    m = collapse_metrics(_stats([6, 2, 0, 0], tokens=4, entropy_sum=2.0, max_sum=3.0))
    assert m["dead_experts"] == 2 and m["dead_expert_ids"] == [2, 3]
    assert m["max_expert_share"] == pytest.approx(6 / 8)
    assert m["routing_entropy"] == pytest.approx(0.5)
    assert m["routing_entropy_norm"] == pytest.approx(0.5 / math.log(4))
    assert m["router_confidence"] == pytest.approx(0.75)


def test_tracker_window_dead_experts_and_token_weighted_means() -> None:
    tr = CollapseTracker(CollapseConfig(window=2))
    tr.update({"l0": _stats([4, 0, 0, 0], 4, 0.0, 4.0)})
    tr.update({"l0": _stats([0, 2, 0, 2], 2, 2.0, 1.0)})
    m = tr.summary()["l0"]
    # window = both steps: expert 2 never routed; expert 0 has 4 of 8 pairs
    assert m["dead_experts"] == 1 and m["dead_expert_ids"] == [2]
    assert m["max_expert_share"] == pytest.approx(0.5)
    assert m["routing_entropy"] == pytest.approx(2.0 / 6)  # token-weighted over the window
    assert m["router_confidence"] == pytest.approx(5.0 / 6)
    assert m["window_steps"] == 2
    tr.update({"l0": _stats([1, 1, 1, 1], 2, 2.0, 1.0)})  # first step leaves the window
    m = tr.summary()["l0"]
    assert m["dead_experts"] == 0 and m["window_steps"] == 2
    assert m["max_expert_share"] == pytest.approx(3 / 8)
    scalars = tr.scalars()
    assert scalars["collapse/l0/dead_experts"] == 0.0
    assert set(scalars) == {f"collapse/l0/{k}" for k in ("routing_entropy", "routing_entropy_norm",
                                                        "dead_experts", "max_expert_share",
                                                        "router_confidence")}


def test_collapsed_router_is_visible() -> None:
    layer = MoELayer(MoEConfig(4, 6, 4, top_k=1, router="switch"), seed=0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1] = 10.0  # expert 1 wins everything, confidently
    tr = CollapseTracker()
    for i in range(3):
        tr.update({"moe": layer(torch.rand(8, 4, generator=torch.Generator().manual_seed(i)) + 0.5).stats})
    m = tr.summary()["moe"]
    assert m["dead_experts"] == 3 and m["dead_expert_ids"] == [0, 2, 3]
    assert m["max_expert_share"] == 1.0
    assert m["router_confidence"] > 0.99
    assert m["routing_entropy_norm"] < 0.05


def test_config_and_input_validation() -> None:
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        CollapseConfig(window=0)
    with pytest.raises(TypeError, match=r"stats\['l0'\] must be an MoEStats"):
        CollapseTracker().update({"l0": {"routed": [1]}})


def test_plot_collapse_draws_one_line_per_layer() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    recs = [{"step": s, "collapse": {"l0": {"routing_entropy_norm": 0.5, "dead_experts": s},
                                     "l1": {"routing_entropy_norm": 0.9, "dead_experts": 0}}}
            for s in range(3)]
    plot_collapse(recs, a, b)
    assert len(a.lines) == 2 and list(b.lines[0].get_ydata()) == [0, 1, 2]
    plt.close(fig)
