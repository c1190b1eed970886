"""The flat all-to-all dispatcher (and, with no group, the EP=1 local one).

Legend: T tokens, D model dim, S kept pairs this rank sends, N rows received, R EP
ranks, e local experts per rank; rank r owns experts ``[r*e, (r+1)*e)``.

Data path (group = the EP group)::

    dispatch:  sort pairs by expert            (permute, on device)
               all-to-all of counts [R, e+1]   (count_exchange; the ONE host sync)
               gather rows x_SD = x_TD[token_S](permute)
               all-to-all of rows, splits      (dispatch_a2a)
               rank-major -> expert-major      (permute)
    combine:   expert-major -> rank-major      (unpermute)
               all-to-all of rows, reversed    (combine_a2a)
               fp32 weighted scatter-add       (unpermute)

The shared steps live in ``steps.py``; this module supplies only the order. Its stages
(``route`` / ``start_*`` / ``finish_*``) also serve the pipelined schedule.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...profiling.timer import NULL_TIMER
from ..capacity import CapacityPlan
from ..permute import combine_rows
from ..router import Routing
from .base import DispatchMetadata
from .staged import StagedDispatcher
from .steps import Chunk, InFlight, exchange_flat_counts, receive, regroup, route_chunks, send, \
    split_sizes, ungroup


class AllToAllDispatcher(StagedDispatcher):
    """Experts sharded over ``group`` (EP size R); ``group=None`` means one rank."""

    def __init__(self, num_experts: int, group: Any, ep_size: int,
                 raise_on_nonfinite: bool = True, timer: Any = NULL_TIMER,
                 name: str = "all_to_all") -> None:
        if num_experts % ep_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        self.num_experts, self.group, self.ep_size = num_experts, group, ep_size
        self.num_local = num_experts // ep_size
        self.raise_on_nonfinite = raise_on_nonfinite
        self.timer = timer
        self.name = name

    def describe(self) -> str:
        return self.name

    # -- stages ----------------------------------------------------------------------
    def route(self, routing: Routing, plan: CapacityPlan, num_chunks: int = 1,
              carry: Optional[torch.Tensor] = None) -> list[Chunk]:
        """Kept pairs per chunk with the counts every rank agreed on (one host sync);
        ``carry`` (a few ints) rides in the count exchange to every peer."""
        return route_chunks(
            routing, plan, self.num_experts, num_chunks,
            lambda kept_nE, nonfinite, rider: exchange_flat_counts(kept_nE, nonfinite, self.group,
                                                                   self.ep_size, rider),
            self.timer, self.raise_on_nonfinite,
            local_extra=None if carry is None else (lambda bounds: ((), carry)))

    def start_dispatch(self, x_TD: torch.Tensor, chunk: Chunk, in_flight: bool = False,
                       marks: Optional[bool] = None):
        marks = not in_flight if marks is None else marks  # backward-time marks (timer.py)
        timer = self.timer
        with timer.phase("permute"):
            x_src = timer.mark(x_TD, "permute") if marks else x_TD
            token_S = chunk.token_S + chunk.start if chunk.start else chunk.token_S
            x_SD = x_src.index_select(0, token_S)
        if marks:
            x_SD = timer.mark(x_SD, "dispatch_a2a")
        input_splits, output_splits, _ = split_sizes(chunk.kept, chunk.recv, self.ep_size)
        flight = send(x_SD, output_splits, input_splits, self.group, "dispatch_a2a", timer, in_flight)
        return flight, chunk, x_TD.dtype

    def finish_dispatch(self, pending) -> tuple[torch.Tensor, DispatchMetadata]:
        flight, chunk, dtype = pending
        x_ND = receive(flight, self.timer)
        x_ND, unregroup_N = regroup(x_ND, chunk.recv, self.ep_size, self.timer)
        input_splits, output_splits, counts_local = split_sizes(chunk.kept, chunk.recv, self.ep_size)
        return x_ND, DispatchMetadata(
            num_tokens=chunk.num_tokens, token_S=chunk.token_S, weight_S=chunk.weight_S,
            input_splits=input_splits, output_splits=output_splits, counts_local=counts_local,
            unregroup_N=unregroup_N, nonfinite_ranks=chunk.nonfinite_ranks, out_dtype=dtype)

    def start_combine(self, y_ND: torch.Tensor, meta: DispatchMetadata, in_flight: bool = False,
                      marks: Optional[bool] = None):
        y_ND = ungroup(y_ND, meta.unregroup_N, self.timer)
        return send(y_ND, meta.input_splits, meta.output_splits, self.group, "combine_a2a",
                    self.timer, in_flight), meta, not in_flight if marks is None else marks

    def finish_combine(self, pending) -> torch.Tensor:
        flight, meta, marks = pending
        y_SD = receive(flight, self.timer)
        if marks:
            y_SD = self.timer.mark(y_SD, "unpermute")  # backward-time mark (profiling only)
        with self.timer.phase("unpermute"):
            return combine_rows(y_SD, meta.token_S, meta.weight_S, meta.num_tokens, meta.out_dtype)


__all__ = ["AllToAllDispatcher", "InFlight"]
