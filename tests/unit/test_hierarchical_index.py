"""Hand-checked index math of the hierarchical exchange (no communication)."""

from __future__ import annotations

import torch

from expert_parallel.moe.permute import node_need


def test_node_need_marks_each_token_once_per_destination_node() -> None:
    # 3 tokens, top-2, 8 experts on 2 nodes (experts 0-3 on node 0, 4-7 on node 1).
    topk_TK = torch.tensor([[0, 5], [1, 2], [6, 7]])
    kept_TK = torch.ones(3, 2, dtype=torch.bool)
    need_MT, uniq_M = node_need(topk_TK, kept_TK, experts_per_node=4, num_nodes=2)
    # node 0 needs tokens 0 and 1 (token 1 twice: still one row); node 1 tokens 0 and 2.
    assert need_MT.tolist() == [True, True, False, True, False, True]
    assert uniq_M.tolist() == [2, 2]


def test_node_need_ignores_dropped_pairs() -> None:
    topk_TK = torch.tensor([[0, 5], [6, 7]])
    kept_TK = torch.tensor([[True, False], [False, True]])
    need_MT, uniq_M = node_need(topk_TK, kept_TK, experts_per_node=4, num_nodes=2)
    # token 0's node-1 pair is dropped; token 1 keeps expert 7 only.
    assert need_MT.tolist() == [True, False, False, True]
    assert uniq_M.tolist() == [1, 1]


def test_node_need_with_no_tokens() -> None:
    need_MT, uniq_M = node_need(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool),
                                experts_per_node=2, num_nodes=3)
    assert need_MT.numel() == 0 and uniq_M.tolist() == [0, 0, 0]
