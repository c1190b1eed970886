"""CapacityTuner: exact what-if drop fractions and the smallest factor meeting a target."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.capacity_tuner import CapacityTuner, CapacityTunerConfig
from expert_parallel.moe.stats import MoEStats


def _stats(routed: list[int], tokens: int) -> MoEStats:
    r = torch.tensor(routed)
    z = torch.zeros((), dtype=torch.int64)
    return MoEStats(r, r, r * 0, r, torch.tensor(tokens), z, z, z.float(), z.float(), z + 1)


def test_hand_derived_drop_curve_and_proposal() -> None:
    # E=4, k=1, T=8 tokens, routed [5,1,1,1]:
    #   cf=1.0 -> C=2 -> drops 3 of 8; cf=2.0 -> C=4 -> 1 of 8; cf=2.5 -> C=5 -> 0.
    moe = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=1, min_capacity=0)
    tuner = CapacityTuner(moe, CapacityTunerConfig(target_drop=0.0, min_factor=1.0, max_factor=3.0, step=0.5))
    tuner.observe(_stats([5, 1, 1, 1], 8))
    curve = dict(tuner.drop_curve())
    assert curve[1.0] == pytest.approx(3 / 8)
    assert curve[2.0] == pytest.approx(1 / 8)
    assert curve[2.5] == 0.0
    assert tuner.propose() == 2.5
    assert tuner.propose() is None  # the window was reset


def test_target_met_on_a_real_layer() -> None:
    moe = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2, capacity_factor=1.0,
                    min_capacity=1)
    layer = MoELayer(moe, seed=3)
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # skew the load so capacity 1.0 drops
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).abs()
    tuner = CapacityTuner(moe, CapacityTunerConfig(target_drop=0.02, max_factor=8.0))
    before = layer(x).stats
    assert before.drop_fraction > 0.02
    tuner.observe(before)
    factor = tuner.propose()
    layer.set_capacity_factor(factor)
    after = layer(x).stats
    assert after.drop_fraction <= 0.02
    # ... and it is the smallest such factor on the grid.
    layer.set_capacity_factor(round(factor - 0.05, 6))
    assert layer(x).stats.drop_fraction > 0.02


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="target_drop"):
        CapacityTunerConfig(target_drop=1.5)
    with pytest.raises(ValueError, match="max_factor"):
        CapacityTunerConfig(min_factor=2.0, max_factor=1.0)
