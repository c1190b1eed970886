"""Fixed-capacity padded dispatch: static shapes and no host synchronisation.

Legend: T tokens, K choices, P = T*K pairs, E experts, e local experts, R EP ranks,
C capacity per expert per source rank, D model dim.

Every source rank writes its kept pairs into an ``[E * C, D]`` send buffer, one block of
C slots per expert (zeros where an expert got fewer than C tokens). Blocks are already
destination-rank-major, so the all-to-all has equal, static splits ``e * C`` and needs
no count exchange. What arrives is ``[R, e, C, D]``, viewed as ``[e, R * C, D]`` for the
experts; a zero row stays zero through a bias-free MLP, so padding never leaks into the
output. Cost: padding compute and traffic (``E * C`` rows instead of the kept ones), the
price DeepSpeed/GShard pay always; here it buys CUDA-graph-capturable shapes.

Non-finite router logits cannot be raised on without a host read, so ``MoEConfig``
requires ``nonfinite_policy='count'`` with ``static_shapes`` (the launcher checks the
reduced stats every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...profiling.timer import NULL_TIMER
from ..capacity import CapacityPlan, positions_in_expert
from ..permute import combine_rows
from ..router import Routing
from .base import Dispatcher, DispatchMetadata
from .steps import receive, send


@dataclass(frozen=True)
class SlotTable:
    """Where each pair sits in the padded buffer (``DispatchMetadata.route``)."""

    token_P: torch.Tensor
    """Source token of every pair (token-major)."""
    dest_P: torch.Tensor
    """Row of each pair in the ``[E*C + 1]`` buffer; dropped pairs point at the last
    (discarded) row."""
    weight_P: torch.Tensor
    """Combine weight, zero for dropped pairs."""
    capacity: int


class PaddedDispatcher(Dispatcher):
    """Static-shape dispatcher over ``group`` (None = single process)."""

    def __init__(self, num_experts: int, group: Any, ep_size: int, timer: Any = NULL_TIMER) -> None:
        self.num_experts, self.group, self.ep_size = num_experts, group, ep_size
        self.num_local = num_experts // ep_size
        self.timer = timer

    def describe(self) -> str:
        return "padded"

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        if plan.capacity is None:
            raise ValueError("static_shapes dispatch needs a capacity (capacity_factor is None)")
        E, C, R, e = self.num_experts, plan.capacity, self.ep_size, self.num_local
        num_tokens, k = routing.topk_idx_TK.shape
        with self.timer.phase("permute"):
            key_P = torch.where(plan.kept_TK, routing.topk_idx_TK,
                                torch.full_like(routing.topk_idx_TK, E)).reshape(-1)
            slot_P = positions_in_expert(key_P, E)  # token order inside each expert
            kept_P = key_P < E
            dest_P = torch.where(kept_P, key_P * C + slot_P, torch.full_like(key_P, E * C))
            token_P = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
            weight_P = routing.topk_weight_TK.reshape(-1) * kept_P.to(routing.topk_weight_TK.dtype)
            buf = x_TD.new_zeros(E * C + 1, x_TD.shape[-1])
            buf = buf.index_add(0, dest_P, x_TD.index_select(0, token_P))[: E * C]
        splits = [e * C] * R  # every slot travels, used or not (the bytes say so)
        recv = receive(send(buf, splits, splits, self.group, "dispatch_a2a", self.timer), self.timer)
        with self.timer.phase("permute"):
            x_ND = recv.view(R, e, C, x_TD.shape[-1]).transpose(0, 1).reshape(e * R * C, x_TD.shape[-1])
        meta = DispatchMetadata(
            num_tokens=num_tokens, token_S=token_P, weight_S=weight_P, input_splits=tuple(splits),
            output_splits=tuple(splits), counts_local=(R * C,) * e, unregroup_N=None,
            nonfinite_ranks=(), out_dtype=x_TD.dtype,
            route=SlotTable(token_P, dest_P, weight_P, C))
        return x_ND, meta

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        R, e, C = self.ep_size, self.num_local, meta.route.capacity
        with self.timer.phase("unpermute"):
            y = y_ND.view(e, R, C, y_ND.shape[-1]).transpose(0, 1).reshape(R * e * C, y_ND.shape[-1])
        splits = [e * C] * R
        back = receive(send(y, splits, splits, self.group, "combine_a2a", self.timer), self.timer)
        with self.timer.phase("unpermute"):
            back = torch.cat([back, back.new_zeros(1, back.shape[-1])])
            y_PD = back.index_select(0, meta.route.dest_P)
            return combine_rows(y_PD, meta.token_S, meta.weight_S, meta.num_tokens, meta.out_dtype)


__all__ = ["PaddedDispatcher", "SlotTable"]
