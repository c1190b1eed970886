"""Capacity and drop decisions: which (token, expert) pairs an expert accepts.

Legend: T tokens, K choices per token, E experts, P = T*K pairs.

Capacity is a per-expert budget for the tokens of *one source rank* (GShard /
DeepSpeed), so the decision is local: no communication, no host sync, O(P) memory.

Priority orders (a pair is kept iff fewer than C pairs of higher priority chose the
same expert):

* ``position`` — choice-major then token order, i.e. pair ``(t, k)`` has priority
  index ``k * T + t``: every token's first choice beats any token's second choice, and
  earlier tokens beat later ones (GShard).
* ``probs`` — descending combine weight; ties broken by the position order.

A dropped pair contributes nothing to the output. A token whose every choice is dropped
gets an all-zero MoE output, so in a residual block the residual stream carries it
through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .permute import count_ids


@dataclass(frozen=True)
class CapacityPlan:
    """Result of the capacity decision for one rank's tokens."""

    kept_TK: torch.Tensor
    """True where the pair survives capacity (bool)."""
    routed_E: torch.Tensor
    """Pairs routed to each expert, before capacity (int64)."""
    kept_E: torch.Tensor
    """Pairs each expert keeps (int64)."""
    capacity: Optional[int]
    """Per-expert capacity applied, or None when dropless."""


def positions_in_expert(expert_P: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For pairs listed in priority order, each pair's 0-based rank within its expert.

    Stable sort by expert, then subtract the start offset of each expert's run.
    ``expert_P`` may hold the sentinel ``num_experts`` for pairs that take no slot.
    """
    num_pairs = expert_P.numel()
    order_P = torch.sort(expert_P, stable=True).indices
    counts = count_ids(expert_P, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_expert_P = expert_P[order_P]
    rank_sorted_P = torch.arange(num_pairs, device=expert_P.device) - starts[sorted_expert_P]
    position_P = torch.empty_like(rank_sorted_P)
    position_P[order_P] = rank_sorted_P
    return position_P


def plan_capacity(
    topk_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
    drop_policy: str = "position",
    valid_TK: Optional[torch.Tensor] = None,
) -> CapacityPlan:
    """Decide which pairs are kept. ``valid_TK`` (bool) masks out unused choice slots
    of routers with a variable number of experts per token; they are neither routed
    nor kept."""
    num_tokens, k = topk_idx_TK.shape
    if valid_TK is None:
        valid_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
    sentinel = torch.full_like(topk_idx_TK, num_experts)
    expert_TK = torch.where(valid_TK, topk_idx_TK, sentinel)
    routed_E = count_ids(expert_TK, num_experts + 1)[:num_experts]
    if capacity is None:
        return CapacityPlan(valid_TK, routed_E, routed_E.clone(), None)

    # Priority order over pairs, as indices into the choice-major flattening (k*T + t).
    expert_P = expert_TK.t().reshape(-1)
    if drop_policy == "position":
        priority_P = torch.arange(expert_P.numel(), device=expert_P.device)
    elif drop_policy == "probs":
        w_P = weight_TK.detach().t().reshape(-1)
        priority_P = torch.sort(-w_P, stable=True).indices
    else:
        raise ValueError(f"drop_policy must be 'position' or 'probs', got {drop_policy!r}")
    position_P = torch.empty_like(expert_P)
    position_P[priority_P] = positions_in_expert(expert_P[priority_P], num_experts)
    kept_P = (position_P < capacity) & (expert_P < num_experts)
    kept_TK = kept_P.reshape(k, num_tokens).t()
    kept_E = count_ids(torch.where(kept_TK, expert_TK, sentinel), num_experts + 1)[:num_experts]
    return CapacityPlan(kept_TK, routed_E, kept_E, capacity)
