"""Dispatchers: move kept (token, expert) pairs to the experts' ranks and back.

Legend: T tokens, D model dim, K choices, S kept pairs sent by this rank, N rows
received for the local experts, R EP ranks, e local experts per rank.

Data path of :class:`AllToAllDispatcher` (group = the EP group)::

    dispatch:  sort pairs by expert            (permute, on device)
               all-to-all of counts [R, e+1]   (count_exchange; the ONE host sync)
               gather rows x_SD = x_TD[token_S](permute)
               all-to-all of rows, splits      (dispatch_a2a)
               rank-major -> expert-major      (permute)
    combine:   expert-major -> rank-major      (unpermute)
               all-to-all of rows, reversed    (combine_a2a)
               fp32 weighted scatter-add       (unpermute)

:class:`LocalDispatcher` (EP=1) has the same interface and skips the communication.
``dispatch`` returns a frozen :class:`DispatchMetadata` that ``combine`` consumes;
nothing is stored on ``self`` between the two, so the layer is re-entrant and safe
under activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..distributed.collectives import (
    all_gather_rows,
    all_to_all_counts,
    all_to_all_rows,
    comm_scope,
)
from ..distributed.hierarchical import hierarchical_combine, hierarchical_dispatch, node_need
from ..profiling.timer import NULL_TIMER
from .capacity import CapacityPlan
from .permute import (
    combine_rows,
    inverse_permutation,
    regroup_rank_to_expert,
    sort_pairs_by_expert,
)
from .router import Routing


class NonFiniteRouterError(FloatingPointError):
    """Router logits held NaN/Inf on at least one rank of the EP group."""


@dataclass(frozen=True)
class DispatchMetadata:
    """Everything ``combine`` needs to undo ``dispatch``; immutable."""

    num_tokens: int
    token_S: torch.Tensor
    """Source token of each kept pair, in expert-sorted order."""
    weight_S: torch.Tensor
    """Combine weight of each kept pair (fp32, carries the router gradient)."""
    input_splits: tuple[int, ...]
    """Rows this rank sends to each EP rank."""
    output_splits: tuple[int, ...]
    """Rows this rank receives from each EP rank."""
    counts_local: tuple[int, ...]
    """Rows per local expert, expert-major (what the experts consume)."""
    unregroup_N: Optional[torch.Tensor]
    """Expert-major -> rank-major row indices (None when there is nothing to undo)."""
    nonfinite_ranks: tuple[int, ...]
    """EP ranks (group-local) whose router logits held NaN/Inf this forward."""
    out_dtype: torch.dtype
    route: Any = None
    """Extra routing facts a dispatcher needs to undo its exchange (the hierarchical one
    keeps its frozen ``NodeRoute`` here); None for the flat exchange."""


@dataclass(frozen=True)
class RoutedPairs:
    """The kept pairs in expert order and the counts every rank agreed on (host ints)."""

    token_S: torch.Tensor
    weight_S: torch.Tensor
    kept: list
    """Pairs this rank sends to each global expert."""
    recv: list
    """Rows this rank receives, [R*e] rank-major."""
    route: Any
    nonfinite_ranks: tuple[int, ...]
    extra: Any
    """Whatever ``_route_extra`` computed before the exchange (device tensors)."""


class LocalDispatcher:
    """EP=1: all experts are local; the only host sync is reading the counts."""

    def __init__(
        self, num_experts: int, timer: Any = NULL_TIMER, raise_on_nonfinite: bool = True
    ) -> None:
        self.num_experts = num_experts
        self.raise_on_nonfinite = raise_on_nonfinite
        self.num_local = num_experts
        self.ep_size = 1
        self.timer = timer

    # -- communication hooks, overridden by the all-to-all dispatchers -------------
    def _exchange_counts(
        self, kept_E: torch.Tensor, nonfinite: torch.Tensor, extra: Any = None
    ) -> tuple[list[int], list[int], list[int], Any]:
        """Returns (kept per global expert, received counts [R*e] rank-major,
        non-finite flags per EP rank, route), host values, with one host sync.
        ``extra`` is dispatcher-specific routing data (hierarchical: per-node unique
        token counts) that rides in the same exchange; None for the flat ones."""
        host = torch.cat([kept_E, nonfinite.reshape(1)]).tolist()
        return host[:-1], host[:-1], host[-1:], None

    def _send(self, x_SD: torch.Tensor, meta_splits: tuple, route: Any, reverse: bool) -> torch.Tensor:
        return x_SD

    def _route_extra(self, routing: Routing, plan: CapacityPlan) -> Any:
        """Device-side routing data computed before the count exchange (none here)."""
        return None

    def _route_pairs(self, routing: Routing, plan: CapacityPlan) -> RoutedPairs:
        """Sort kept pairs by expert and exchange counts (the one host sync); every EP rank
        raises together on non-finite logits."""
        num_tokens, k = routing.topk_idx_TK.shape
        with self.timer.phase("permute"):
            order_P = sort_pairs_by_expert(routing.topk_idx_TK, plan.kept_TK, self.num_experts)
            extra = self._route_extra(routing, plan)
        # comm_scope labels a failed/timed-out collective with its phase (the layer adds
        # its name), so a dead peer surfaces as a named error, not a bare backend one.
        with self.timer.phase("count_exchange"), comm_scope(phase="count_exchange"):
            kept, recv, flags, route = self._exchange_counts(plan.kept_E, routing.nonfinite, extra)
        nonfinite_ranks = tuple(r for r, f in enumerate(flags) if f)
        if nonfinite_ranks and self.raise_on_nonfinite:
            # Every EP rank saw the same flags in the same collective: all raise here,
            # before the token all-to-all, so no peer is left waiting.
            raise NonFiniteRouterError(
                f"router logits are NaN/Inf on EP rank(s) {list(nonfinite_ranks)}"
            )
        with self.timer.phase("permute"):
            pair_S = order_P[: sum(kept)]
            token_S = torch.div(pair_S, k, rounding_mode="floor")
            weight_S = routing.topk_weight_TK.reshape(-1).index_select(0, pair_S)
        return RoutedPairs(token_S, weight_S, kept, recv, route, nonfinite_ranks, extra)

    def _split_sizes(self, kept: list[int], recv: list[int]) -> tuple[tuple, tuple, tuple]:
        R, e = self.ep_size, self.num_local
        input_splits = tuple(sum(kept[r * e : (r + 1) * e]) for r in range(R))
        output_splits = tuple(sum(recv[r * e : (r + 1) * e]) for r in range(R))
        counts_local = tuple(sum(recv[r * e + l] for r in range(R)) for l in range(e))
        return input_splits, output_splits, counts_local

    def _finish(self, x_ND: torch.Tensor, x_TD: torch.Tensor, pairs: RoutedPairs, route: Any,
                to_rank_major_N: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DispatchMetadata]:
        """Regroup the received rows rank-major -> local-expert-major (after
        ``to_rank_major_N``, when the exchange delivered another order: both in one
        gather); build the metadata."""
        R, e = self.ep_size, self.num_local
        input_splits, output_splits, counts_local = self._split_sizes(pairs.kept, pairs.recv)
        unregroup_N = None
        if (R > 1 and e > 1) or to_rank_major_N is not None:
            with self.timer.phase("permute"):
                regroup_N = to_rank_major_N
                if R > 1 and e > 1:
                    counts_Re = torch.tensor(pairs.recv, device=x_TD.device).view(R, e)
                    expert_major_N = regroup_rank_to_expert(counts_Re, sum(output_splits))
                    regroup_N = expert_major_N if regroup_N is None else regroup_N[expert_major_N]
                x_ND = x_ND.index_select(0, regroup_N)
                unregroup_N = inverse_permutation(regroup_N)
        meta = DispatchMetadata(
            num_tokens=x_TD.shape[0],
            token_S=pairs.token_S,
            weight_S=pairs.weight_S,
            input_splits=input_splits,
            output_splits=output_splits,
            counts_local=counts_local,
            unregroup_N=unregroup_N,
            nonfinite_ranks=pairs.nonfinite_ranks,
            out_dtype=x_TD.dtype,
            route=route,
        )
        return x_ND, meta

    # -- the interface --------------------------------------------------------------
    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan
    ) -> tuple[torch.Tensor, DispatchMetadata]:
        """Send kept pairs to their experts. Returns rows in local-expert-major order."""
        pairs = self._route_pairs(routing, plan)
        with self.timer.phase("permute"):
            x_SD = self.timer.mark(x_TD, "permute").index_select(0, pairs.token_S)
        input_splits, output_splits, _ = self._split_sizes(pairs.kept, pairs.recv)
        x_SD = self.timer.mark(x_SD, "dispatch_a2a")  # backward-time mark (profiling only)
        x_ND = self._send(x_SD, (output_splits, input_splits), pairs.route, reverse=False)
        return self._finish(x_ND, x_TD, pairs, pairs.route)

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        """Bring expert outputs home and sum them per token with their weights."""
        if meta.unregroup_N is not None:
            with self.timer.phase("unpermute"):
                y_ND = y_ND.index_select(0, meta.unregroup_N)
        y_SD = self._send(y_ND, (meta.input_splits, meta.output_splits), meta.route, reverse=True)
        y_SD = self.timer.mark(y_SD, "unpermute")  # backward-time mark (profiling only)
        with self.timer.phase("unpermute"):
            return combine_rows(y_SD, meta.token_S, meta.weight_S, meta.num_tokens, meta.out_dtype)


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over ``group`` (EP size R); rank r owns experts [r*e, (r+1)*e)."""

    def __init__(
        self,
        num_experts: int,
        group: Any,
        ep_size: int,
        timer: Any = NULL_TIMER,
        raise_on_nonfinite: bool = True,
    ) -> None:
        super().__init__(num_experts, timer, raise_on_nonfinite)
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by ep_size={ep_size}"
            )
        self.group = group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size

    def _exchange_counts(self, kept_E, nonfinite, extra=None):
        """All-to-all over the EP group of a [R, e+1] block: row r holds the pairs this
        rank sends to each of rank r's experts plus this rank's non-finite flag, so every
        rank learns every peer's flag in the same collective and can fail together.
        Host sync: exactly one ``tolist`` of local + received counts."""
        R, e = self.ep_size, self.num_local
        flag_R1 = nonfinite.reshape(1, 1).expand(R, 1).to(kept_E.dtype)
        send_Rx = torch.cat([kept_E.view(R, e), flag_R1], dim=1)
        recv_Rx = all_to_all_counts(send_Rx, self.group)
        host = torch.cat([kept_E, recv_Rx.reshape(-1)]).tolist()
        recv = host[self.num_experts :]
        counts = [recv[r * (e + 1) + l] for r in range(R) for l in range(e)]
        flags = [recv[r * (e + 1) + e] for r in range(R)]
        return host[: self.num_experts], counts, flags, None

    def _send(self, x_SD, meta_splits, route, reverse):
        output_splits, input_splits = meta_splits
        phase = "combine_a2a" if reverse else "dispatch_a2a"
        itemsize = x_SD.element_size() * (x_SD.shape[-1] if x_SD.dim() > 1 else 1)
        self.timer.add_bytes(phase, sum(input_splits) * itemsize, sum(output_splits) * itemsize)
        with self.timer.phase(phase), comm_scope(phase=phase):
            return self._exchange_rows(x_SD, output_splits, input_splits, route, reverse)

    def _exchange_rows(self, x_SD, output_splits, input_splits, route, reverse):
        return all_to_all_rows(x_SD, output_splits, input_splits, self.group)


class HierarchicalDispatcher(AllToAllDispatcher):
    """Rows travel in two hops, across nodes first with one copy of a token per
    destination node, then fanned out inside the node; the combine reduces per node
    before crossing back (see ``distributed/hierarchical.py``). The count exchange is an
    all-gather of every rank's per-expert counts plus its distinct tokens per node
    (R x (E+1+M) ints), so each rank knows every split both hops need; still one sync."""

    def __init__(self, num_experts: int, groups: Any, timer: Any = NULL_TIMER,
                 raise_on_nonfinite: bool = True) -> None:
        super().__init__(num_experts, groups.ep_group, groups.ep_size, timer, raise_on_nonfinite)
        self.groups = groups
        self.num_nodes = groups.ep_size // groups.ranks_per_node

    def _route_extra(self, routing, plan):
        return node_need(routing.topk_idx_TK, plan.kept_TK,
                         self.num_local * self.groups.ranks_per_node, self.num_nodes)

    def _exchange_counts(self, kept_E, nonfinite, extra=None):
        R, e, E, M = self.ep_size, self.num_local, self.num_experts, self.num_nodes
        _, uniq_M = extra
        mine = torch.cat([kept_E, nonfinite.reshape(1).to(kept_E.dtype), uniq_M.to(kept_E.dtype)])
        table = torch.cat(all_gather_rows(mine, self.group)).tolist()  # the one host sync
        width = E + 1 + M
        rows = [table[s * width : (s + 1) * width] for s in range(R)]
        me = self.groups.ep_rank
        counts = [rows[r][me * e + l] for r in range(R) for l in range(e)]
        flags = [rows[r][E] for r in range(R)]
        counts_RR = tuple(tuple(sum(rows[s][d * e : (d + 1) * e]) for d in range(R)) for s in range(R))
        uniq_RM = tuple(tuple(rows[s][E + 1 :]) for s in range(R))
        return rows[me][:E], counts, flags, (counts_RR, uniq_RM)

    def _add_bytes(self, phase: str, rows_sent: int, rows_received: int, row_bytes: int) -> None:
        self.timer.add_bytes(phase, rows_sent * row_bytes, rows_received * row_bytes)

    def dispatch(self, x_TD, routing, plan):
        pairs = self._route_pairs(routing, plan)
        counts_RR, uniq_RM = pairs.route
        g = self.groups
        # Backward-time marks (profiling only): the gather is fused into the hops, so the
        # "permute" backward segment is empty and the hops' backward counts as dispatch_a2a.
        x_TD = self.timer.mark(self.timer.mark(x_TD, "permute"), "dispatch_a2a")
        with self.timer.phase("dispatch_a2a"), comm_scope(phase="dispatch_a2a"):
            x_ND, node_route = hierarchical_dispatch(
                x_TD, pairs.token_S, pairs.weight_S, pairs.extra[0], counts_RR, uniq_RM, g.ep_rank,
                g.ranks_per_node, g.intra_group, g.inter_group)
        # Bytes over both hops (hop 1 carries unique tokens, hop 2 rows).
        self._add_bytes("dispatch_a2a", sum(node_route.uniq_send) + sum(node_route.intra_send),
                        sum(node_route.uniq_recv) + sum(node_route.intra_recv),
                        x_TD.element_size() * x_TD.shape[-1])
        return self._finish(x_ND, x_TD, pairs, node_route, node_route.to_rank_major_N)

    def combine(self, y_ND, meta):
        if meta.unregroup_N is not None:
            with self.timer.phase("unpermute"):
                y_ND = y_ND.index_select(0, meta.unregroup_N)
        r, g = meta.route, self.groups
        row_bytes = y_ND.element_size() * y_ND.shape[-1]
        self._add_bytes("combine_a2a", sum(r.intra_recv) + sum(r.uniq_recv),
                        sum(r.intra_send) + sum(r.uniq_send), row_bytes)
        with self.timer.phase("combine_a2a"), comm_scope(phase="combine_a2a"):
            out_TD = hierarchical_combine(y_ND, r, meta.num_tokens, meta.out_dtype,
                                          g.intra_group, g.inter_group)
        return self.timer.mark(out_TD, "unpermute")


def make_dispatcher(config: Any, groups: Any) -> LocalDispatcher:
    """The dispatcher a layer with ``config`` needs on ``groups``."""
    raise_nf = config.nonfinite_policy == "raise"
    if config.static_shapes:
        from .padded import PaddedDispatcher  # padded.py imports this module's siblings

        return PaddedDispatcher(config.num_experts, groups.ep_group, groups.ep_size)
    if groups.ep_size == 1:
        return LocalDispatcher(config.num_experts, raise_on_nonfinite=raise_nf)
    if config.a2a_algorithm == "hierarchical":
        if not groups.ranks_per_node:
            raise ValueError(
                "a2a_algorithm='hierarchical' needs ParallelGroups.build(..., ranks_per_node=L) "
                f"with 1 < L < ep_size={groups.ep_size}; got ranks_per_node={groups.ranks_per_node}"
            )
        return HierarchicalDispatcher(config.num_experts, groups, raise_on_nonfinite=raise_nf)
    if config.overlap_chunks > 1:
        from .overlap import OverlappedAllToAllDispatcher  # subclasses this module's class

        return OverlappedAllToAllDispatcher(config.num_experts, groups.ep_group, groups.ep_size,
                                            config.overlap_chunks, raise_on_nonfinite=raise_nf)
    return AllToAllDispatcher(config.num_experts, groups.ep_group, groups.ep_size,
                              raise_on_nonfinite=raise_nf)
