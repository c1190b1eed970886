"""All-gather dispatch for small token counts (decoding), with no count exchange.

Legend: T tokens on this rank, C = ``allgather_max_tokens`` (the padded per-rank size),
R EP ranks, K choices, e local experts (slots), D model dim, N local (token, expert) rows.

At a handful of tokens per rank an MoE layer's exchanges are latency-bound: the flat
path pays three round trips (count exchange, dispatch, combine). This one pays two and
needs no count exchange, because its shapes are static: every rank pads its tokens to C
rows and sends them, with their routing, to every EP rank (an all-gather, as one
all-to-all with equal splits); each rank runs its experts on the gathered rows routed to
them; the partial outputs go back to their source rank and are summed there (a
reduce-scatter, again one equal-split all-to-all)::

    [x_pad | side] [C, D + 2K + 2] (rows | weight, expert or sentinel, T, NaN flag)
       ── all-to-all, splits C ──►  [X | side] [R*C, D + 2K + 2]     (one message)
    host read: rows per local expert + every rank's T and flag          (the one host sync)
    local rows: stable sort of the gathered pairs by local expert  ->  experts  ->  y * w
       index_add into out [R*C, D] (fp32)  ── all-to-all, splits C ──►  [R, C, D]  sum over R

Capacity and drops are decided per source rank before the gather, as in every mode, so
the stats are the same. Every rank learns every peer's T and NaN flag from the gathered
side rows: non-finite logits raise on all ranks together, and a rank holding more than C
tokens makes all ranks run that forward through the flat exchange instead (collectively,
so nobody is left waiting).

``a2a_algorithm="auto"`` (:class:`AutoDispatcher`): the all-gather path while the largest
per-rank token count of the previous forward was at most C, the flat path otherwise; the
flat count exchange carries each rank's T, so every rank holds the same history and
takes the same path. The default C is the crossover measured by
``benchmarks/decode_latency.py`` on this project's CPU machine.

Padding: both pad every rank's rows to the largest per-rank count the previous forward
gathered, rounded up to a power of two (at most C; C before the first), not to C, so a
decode batch pays for the rows it has. When some rank now holds more (but at most C),
every rank sees it in the gathered headers and they all gather once more at the new
size; a batch that keeps its size (decoding) gathers once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ...distributed.collectives import CALL_COUNTS
from ...profiling.host_sync import host_sync
from ..capacity import CapacityPlan
from ..permute import count_ids
from ..router import Routing
from .all_to_all import AllToAllDispatcher
from .base import Dispatcher, DispatchMetadata, ExpertFn, InnerTimer, NonFiniteRouterError
from .steps import receive, send


@dataclass(frozen=True)
class GatherRoute:
    """What the all-gather combine needs (``DispatchMetadata.route``)."""

    rows_N: torch.Tensor
    """Row of each local (token, expert) pair among the R*C gathered tokens."""
    weight_N: torch.Tensor
    capacity: int
    num_tokens: int


class AllGatherDispatcher(Dispatcher):
    """All-gather / reduce-scatter dispatch of up to ``max_tokens`` tokens per rank;
    falls back to ``flat`` (collectively) for a forward with more."""

    def __init__(self, flat: AllToAllDispatcher, max_tokens: int, raise_on_nonfinite: bool = True) -> None:
        self.flat, self.max_tokens, self.raise_on_nonfinite = flat, max_tokens, raise_on_nonfinite
        self.ep_size, self.group = flat.ep_size, flat.group
        self.num_experts, self.num_local = flat.num_experts, flat.num_local
        self.rank = torch.distributed.get_rank(self.group) if self.group is not None else 0
        self.seen_max_tokens: Optional[int] = None
        """Largest per-rank count of the last gather (the same on every rank)."""
        self.last_pad: Optional[int] = None
        """Rows per rank the last dispatch gathered (``None``: it ran the flat exchange)."""

    timer = InnerTimer("flat")

    def describe(self) -> str:
        return f"allgather(max_tokens={self.max_tokens})"

    def pad_size(self) -> int:
        """Rows per rank of the next gather: the last seen count rounded up to a power of
        two, at most ``max_tokens``."""
        if self.seen_max_tokens is None:
            return self.max_tokens
        return min(self.max_tokens, 1 << max(0, self.seen_max_tokens - 1).bit_length())

    def gather_adaptive(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        """:meth:`gather` padded to :meth:`pad_size`, once more at the right size when some
        rank held more; ``None`` when some rank holds more than ``max_tokens``."""
        size, self.last_pad = self.pad_size(), None
        got = self.gather(x_TD, routing, plan, pad_to=size)
        if got is None and size < self.max_tokens and self.seen_max_tokens <= self.max_tokens:
            got = self.gather(x_TD, routing, plan, pad_to=self.pad_size())
        return got

    def gather(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan, pad_to: Optional[int] = None):
        """Dispatch by all-gather, every rank's tokens padded to ``pad_to`` rows (default
        ``max_tokens``; every rank must pass the same); ``None`` when some rank holds more."""
        C = self.max_tokens if pad_to is None else pad_to
        R, K, E, e = self.ep_size, routing.topk_idx_TK.shape[1], self.num_experts, self.num_local
        T, timer = x_TD.shape[0], self.timer
        D = x_TD.shape[-1]
        with timer.phase("permute"):
            # ONE message: the padded rows and their routing side by side, in a dtype wide
            # enough for both (the rows', or the combine weights' when wider; expert ids and
            # token counts are small integers, exact in it). A decode-size exchange is
            # latency-bound: one exchange instead of two matters, the extra bytes do not.
            dt = torch.promote_types(x_TD.dtype, routing.topk_weight_TK.dtype)
            n = min(T, C)
            msg = x_TD.new_zeros(C, D + 2 * K + 2, dtype=dt)
            msg[:n, :D] = x_TD[:n]
            msg[:n, D : D + K] = routing.topk_weight_TK[:n]
            msg[:, D + K : D + 2 * K] = E  # pad pairs (and dropped ones, below): the sentinel
            msg[:n, D + K : D + 2 * K] = torch.where(plan.kept_TK, routing.topk_idx_TK, E)[:n]
            msg[:, D + 2 * K] = T  # the header: every row carries this rank's T and NaN flag
            msg[:, D + 2 * K + 1] = routing.nonfinite
        splits = [C] * R
        recv = receive(send(msg.repeat(R, 1), splits, splits, self.group, "dispatch_a2a", timer), timer)
        S = recv[:, D:]
        with timer.phase("permute"):
            key_NK = S[:, K : 2 * K].detach().to(torch.long)
            mine = torch.div(key_NK, e, rounding_mode="floor") == self.rank
            local_NK = torch.where(mine, key_NK - self.rank * e, torch.full_like(key_NK, e))
            counts = count_ids(local_NK, e + 1)[:e]
            peers = S.detach()[:: C, 2 * K :].to(torch.float64)  # one header per source rank
        with timer.phase("count_exchange"), host_sync("allgather_counts"):
            host = torch.cat([counts.to(torch.float64), peers.reshape(-1)]).tolist()
        counts_local = tuple(int(v) for v in host[:e])
        tokens = [int(host[e + 2 * r]) for r in range(R)]
        flags = tuple(r for r in range(R) if host[e + 2 * r + 1])
        if flags and self.raise_on_nonfinite:
            raise NonFiniteRouterError(f"router logits are NaN/Inf on EP rank(s) {list(flags)}")
        self.seen_max_tokens = max(tokens)
        if max(tokens) > C:
            return None
        self.last_pad = C
        with timer.phase("permute"):
            order = torch.sort(local_NK.reshape(-1), stable=True).indices[: sum(counts_local)]
            rows_N = torch.div(order, K, rounding_mode="floor")
            weight_N = S[:, :K].reshape(-1).index_select(0, order).to(routing.topk_weight_TK.dtype)
            x_ND = recv[:, :D].index_select(0, rows_N).to(x_TD.dtype)  # fresh rows: [N, D] strides
        meta = DispatchMetadata(num_tokens=T, token_S=rows_N, weight_S=weight_N, input_splits=tuple(splits),
                                output_splits=tuple(splits), counts_local=counts_local, unregroup_N=None,
                                nonfinite_ranks=flags, out_dtype=x_TD.dtype,
                                route=GatherRoute(rows_N, weight_N, C, T))
        return x_ND, meta

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        got = self.gather_adaptive(x_TD, routing, plan)
        if got is None:
            CALL_COUNTS["allgather_fallback"] += 1
            return self.flat.dispatch(x_TD, routing, plan)
        return got

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        if not isinstance(meta.route, GatherRoute):
            return self.flat.combine(y_ND, meta)
        r, R, timer = meta.route, self.ep_size, self.timer
        with timer.phase("unpermute"):
            acc = torch.promote_types(torch.float32, r.weight_N.dtype)
            out = torch.zeros(R * r.capacity, y_ND.shape[-1], dtype=acc, device=y_ND.device)
            out = out.index_add(0, r.rows_N, y_ND.to(acc) * r.weight_N.unsqueeze(-1)).to(y_ND.dtype)
        splits = [r.capacity] * R
        back = receive(send(out, splits, splits, self.group, "combine_a2a", timer), timer)
        with timer.phase("unpermute"):
            total = back.view(R, r.capacity, back.shape[-1]).to(acc).sum(0)
            return total[: r.num_tokens].to(meta.out_dtype)


class AutoDispatcher(Dispatcher):
    """``a2a_algorithm="auto"``: all-gather while the previous forward's largest per-rank
    token count was at most ``max_tokens``, flat otherwise (see the module docstring)."""

    def __init__(self, flat: AllToAllDispatcher, max_tokens: int, raise_on_nonfinite: bool = True) -> None:
        self.gathering = AllGatherDispatcher(flat, max_tokens, raise_on_nonfinite)
        self.flat = flat

    timer = InnerTimer("flat")

    def describe(self) -> str:
        return f"auto(allgather up to {self.gathering.max_tokens} tokens/rank, else all_to_all)"

    @property
    def previous_max_tokens(self) -> Optional[int]:
        """Largest per-rank count of the previous forward (``None`` before the first)."""
        return self.gathering.seen_max_tokens

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        previous, self.gathering.last_pad = self.previous_max_tokens, None
        if previous is not None and previous <= self.gathering.max_tokens:
            got = self.gathering.gather_adaptive(x_TD, routing, plan)
            if got is not None:
                return got
        # The flat exchange carries each rank's T: every rank learns the same largest count.
        carry = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
        (chunk,) = self.flat.route(routing, plan, carry=carry)
        self.gathering.seen_max_tokens = max(p[0] for p in chunk.peer_ints)
        return self.flat.finish_dispatch(self.flat.start_dispatch(x_TD, chunk))

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        return self.gathering.combine(y_ND, meta)

    def run(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan, experts: ExpertFn,
            concurrent: Optional[Callable[[bool], Any]] = None) -> torch.Tensor:
        return Dispatcher.run(self, x_TD, routing, plan, experts, concurrent)


__all__ = ["AllGatherDispatcher", "AutoDispatcher", "GatherRoute"]
