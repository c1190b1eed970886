"""At most one device-to-host sync per MoE layer forward, none in backward, none at
all in the static-shape mode. Counted on real gloo ranks by wrapping every Tensor method
that reads device data back to the host."""

from __future__ import annotations


import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from tests.harness import count_host_reads, run_ranks



MODES = {
    "flat": ({}, {}),
    "overlap": ({"overlap_chunks": 2}, {}),
    "hierarchical": ({"a2a_algorithm": "hierarchical"}, {"ranks_per_node": 2}),
    "static": ({"static_shapes": True, "eval_capacity_factor": 1.25, "nonfinite_policy": "count"}, {}),
}


def _worker(rank: int, world: int) -> dict:
    out = {}
    for mode, (overrides, group_kwargs) in MODES.items():
        groups = ParallelGroups.build(4, **group_kwargs)
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=8, top_k=2,
                        capacity_factor=1.25, **overrides)
        layer = MoELayer(cfg, groups, seed=1)
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        with count_host_reads() as fwd:
            res = layer(x)
        loss = res.output.square().sum() + res.aux_loss
        with count_host_reads() as bwd:
            loss.backward()
        out[mode] = (fwd["n"], bwd["n"])
    return out


@pytest.fixture(scope="module")
def counts() -> list[dict]:
    return run_ranks(_worker, 4, timeout=120)


@pytest.mark.parametrize("mode,expected", [("flat", 1), ("overlap", 1), ("hierarchical", 1), ("static", 0)])
def test_host_syncs_per_forward(counts, mode, expected) -> None:
    for rank_counts in counts:
        fwd, bwd = rank_counts[mode]
        assert fwd == expected, f"{mode}: {fwd} host reads in forward"
        assert bwd == 0, f"{mode}: {bwd} host reads in backward"


def test_single_process_layer_syncs_once() -> None:
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    x = torch.randn(10, 8)
    with count_host_reads() as fwd:
        layer(x)
    assert fwd["n"] == 1
