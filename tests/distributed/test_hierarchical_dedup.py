"""The hierarchical exchange sends a token across nodes once per destination node.

Four gloo ranks as two emulated nodes of two (EP=4, E=8, top-2: experts 0-3 live on node 0,
4-7 on node 1). The bytes the dispatcher records for the dispatch are checked against a
count made here from the routing alone: each rank sends one row per distinct
(token, destination node) over the inter-node hop, and relays, inside its node, the rows
of every same-local-index source for that node. A rigged router that sends every token
to two experts of node 1 must put exactly T rows (not 2T) on the inter-node hop, and the
output must still equal the flat exchange's.
"""

from __future__ import annotations

import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.profiling.timer import PhaseTimer
from tests.harness import run_ranks

L, E, K, D = 2, 8, 2, 8
TOKENS = [11, 0, 7, 13]


def _worker(rank: int, world: int, rigged: bool) -> dict:
    out = {}
    for algo, rpn in (("flat", 0), ("hierarchical", L)):
        groups = ParallelGroups.build(4, ranks_per_node=rpn)
        cfg = MoEConfig(hidden_size=D, ffn_hidden_size=12, num_experts=E, top_k=K, a2a_algorithm=algo)
        layer = MoELayer(cfg, groups, seed=3)
        if rigged:  # with positive inputs, every token picks experts 4 and 5 (node 1)
            with torch.no_grad():
                layer.router.weight.mul_(0.01)
                layer.router.weight[4:6] += torch.tensor([[1.0], [0.9]])
        x = torch.randn(TOKENS[rank], D, generator=torch.Generator().manual_seed(rank)).abs()
        timer = PhaseTimer(x.device)
        layer.set_timer(timer)
        res = layer(x)
        routing = layer.router(x)
        out[algo] = {"output": res.output.detach(), "topk": routing.topk_idx_TK,
                     "sent": timer.bytes_sent["dispatch_a2a"], "received": timer.bytes_received["dispatch_a2a"]}
    return out


def _expected_rows(topks: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(unique rows over the inter-node hop, rows relayed inside the node) per rank."""
    per_node = E // (4 // L)
    out = []
    for me, topk in enumerate(topks):
        m, i = divmod(me, L)
        uniq = len({(t, int(e) // per_node) for t in range(topk.shape[0]) for e in topk[t]})
        relayed = sum(int((topks[s] // per_node == m).sum()) for s in range(4) if s % L == i)
        out.append((uniq, relayed))
    return out


def _check(rigged: bool) -> list[tuple[int, int]]:
    results = run_ranks(_worker, 4, rigged)
    topks = [r["hierarchical"]["topk"] for r in results]
    expected = _expected_rows(topks)
    row_bytes = D * 4
    for rank, r in enumerate(results):
        assert torch.equal(r["flat"]["topk"], r["hierarchical"]["topk"])
        torch.testing.assert_close(r["hierarchical"]["output"], r["flat"]["output"], atol=1e-6, rtol=1e-5)
        uniq, relayed = expected[rank]
        assert r["hierarchical"]["sent"] == (uniq + relayed) * row_bytes, f"rank {rank}"
        assert r["flat"]["sent"] == TOKENS[rank] * K * row_bytes, f"rank {rank}"
    return expected


def test_inter_node_rows_are_deduplicated_per_node() -> None:
    expected = _check(rigged=False)
    # Random routing: some tokens hit both experts on one node, so fewer unique rows
    # than (token, expert) rows in total.
    assert sum(u for u, _ in expected) < K * sum(TOKENS)


def test_two_experts_on_one_node_cross_once() -> None:
    expected = _check(rigged=True)
    assert [u for u, _ in expected] == TOKENS  # one row per token, not K


def _node_limited_worker(rank: int, world: int, topk_groups: int) -> dict:
    groups = ParallelGroups.build(4, ranks_per_node=L)
    # Node-limited routing: one group per node (experts 0-3 on node 0, 4-7 on node 1).
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=12, num_experts=E, top_k=3, num_groups=2,
                    topk_groups=topk_groups, a2a_algorithm="hierarchical")
    layer = MoELayer(cfg, groups, seed=5)
    x = torch.randn(TOKENS[rank], D, generator=torch.Generator().manual_seed(rank))
    timer = PhaseTimer(x.device)
    layer.set_timer(timer)
    layer(x)
    return {"topk": layer.router(x).topk_idx_TK, "sent": timer.bytes_sent["dispatch_a2a"]}


def test_node_limited_routing_crosses_at_most_topk_groups_nodes() -> None:
    results = run_ranks(_node_limited_worker, 4, 1)
    topks = [r["topk"] for r in results]
    for rank, r in enumerate(results):
        nodes = topks[rank] // (E // 2)
        assert bool((nodes == nodes[:, :1]).all()), "a token left its one chosen node"
        uniq, relayed = _expected_rows(topks)[rank]
        assert uniq == TOKENS[rank]  # one row per token: at most topk_groups=1 node each
        assert r["sent"] == (uniq + relayed) * D * 4
