"""Two-level (hierarchical) exchange with per-node token de-duplication.

Legend: T tokens of the batch (a chunk under the pipelined run), D model dim, R EP ranks
= M nodes x L ranks per node; rank ``(m, i)`` has EP index ``m*L + i``. S kept (token,
expert) rows this rank sends, U unique (destination node, token) pairs it sends, V unique
rows received over the inter-node hop, Q (token, expert) rows those expand to, N rows
this rank's experts receive. ``counts_RR[s][d]`` = rows EP rank s sends to EP rank d and
``uniq_RM[s][n]`` = distinct tokens EP rank s sends to node n; every rank knows both
tables after the one count exchange (an all-gather), so every split is a host int.

Why two hops: on a cluster the inter-node link is several times slower than the
node-local one. A flat all-to-all sends a token across it once per *expert* it picks on
a remote node; here it crosses once per remote *node* (the DeepEP idea, our code), and
is fanned out to that node's ranks over the fast link.

Dispatch (rank (m, i))::

    hop 1  inter-node, group = the M ranks with local index i (one per node):
           unique tokens x_UD, node-major (ascending token within a node)  -> (n, i)
           + per row: its index into that node's unique block, and its combine weight
    expand on (n, i): x_QD = x_VD[index]; rows ordered (source node, dest local j, ...)
           regrouped to (j, source node)-major
    hop 2  intra-node, group = the L ranks of node n: block j -> (n, j)
    on (n, j): blocks arrive (source local i', source node)-major; regrouped to
           (source node, i') = source-rank-major, then expert-major (one gather).

Combine runs the hops backwards and *reduces* instead of copying: on (n, i) the weighted
expert outputs of a token's rows are summed into one row per (node, token), which
crosses the slow link once and is summed over nodes at home. Forward and backward cross
the slow link with U rows instead of S. Numerics: the same products as the flat combine,
summed per node first, so results equal it up to fp32 summation order.

Under the pipelined schedule (``overlapped.py``) hop 1 of each chunk is in flight while
the experts compute another chunk; hop 2 is node-local and runs synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ...distributed.collectives import all_gather_rows, comm_scope, start_all_to_all, wait_all_to_all
from ...profiling.host_sync import host_sync
from ...profiling.timer import NULL_TIMER
from ..capacity import CapacityPlan
from ..permute import exclusive_offsets, host_ints, node_need, regroup_rank_to_expert
from ..router import Routing
from .base import DispatchMetadata
from .staged import StagedDispatcher
from .steps import Chunk, CountTable, receive, regroup, route_chunks, send, split_sizes, ungroup


@dataclass(frozen=True)
class NodeRoute:
    """Everything the hierarchical combine needs to undo the dispatch (immutable)."""

    token_U: torch.Tensor
    """Batch-local source token of each unique (node, token) row this rank sent."""
    uniq_send: tuple[int, ...]
    """Unique rows this rank sent to each node (hop 1 input splits)."""
    uniq_recv: tuple[int, ...]
    """Unique rows this rank received from each source node (hop 1 output splits)."""
    index_Q: torch.Tensor
    """For each row the relay sends in hop 2 ((j, source node)-major), its row in the
    block of unique rows it received in hop 1."""
    weight_Q: torch.Tensor
    """Combine weight of each of those rows (fp32, carries the router gradient)."""
    intra_send: tuple[int, ...]
    """Rows the relay sends to each node-local rank (hop 2 input splits)."""
    intra_recv: tuple[int, ...]
    """Rows this rank receives from each node-local relay (hop 2 output splits)."""


class HierarchicalDispatcher(StagedDispatcher):
    """Rows travel in two hops, across nodes first with one copy of a token per
    destination node, then fanned out inside the node. The count exchange is an
    all-gather of every rank's per-expert counts, NaN flag and distinct tokens per node
    (R x (n*E + 1 + n*M) ints); still one host sync."""

    def __init__(self, num_experts: int, groups: Any, raise_on_nonfinite: bool = True,
                 timer: Any = NULL_TIMER) -> None:
        self.num_experts, self.groups = num_experts, groups
        self.ep_size, self.L = groups.ep_size, groups.ranks_per_node
        self.num_nodes = self.ep_size // self.L
        self.num_local = num_experts // self.ep_size
        self.raise_on_nonfinite = raise_on_nonfinite
        self.timer = timer

    def describe(self) -> str:
        return f"hierarchical(ranks_per_node={self.L})"

    # -- count exchange ------------------------------------------------------------------
    def _need(self, routing: Routing, plan: CapacityPlan, bounds: Sequence[int]):
        """Per chunk: which (node, token) rows are needed, and how many per node."""
        need, uniq = [], []
        for c in range(len(bounds) - 1):
            a, b = bounds[c], bounds[c + 1]
            need_MT, uniq_M = node_need(routing.topk_idx_TK[a:b], plan.kept_TK[a:b],
                                        self.num_local * self.L, self.num_nodes)
            need.append(need_MT)
            uniq.append(uniq_M)
        return need, torch.cat(uniq)

    def _exchange(self, kept_nE: torch.Tensor, nonfinite: torch.Tensor, uniq_nM: torch.Tensor) -> CountTable:
        R, e, E, M = self.ep_size, self.num_local, self.num_experts, self.num_nodes
        n = kept_nE.shape[0]
        mine = torch.cat([kept_nE.reshape(-1), nonfinite.reshape(1).to(kept_nE.dtype),
                          uniq_nM.to(kept_nE.dtype)])
        gathered = torch.cat(all_gather_rows(mine, self.groups.ep_group))
        with host_sync("count_exchange"):  # the one sync
            table = gathered.tolist()
        width = n * E + 1 + n * M
        rows = [table[s * width : (s + 1) * width] for s in range(R)]
        me = self.groups.ep_rank
        kept, recv, extra = [], [], []
        for c in range(n):
            base = c * E
            kept.append(tuple(rows[me][base : base + E]))
            recv.append(tuple(rows[r][base + me * e + l] for r in range(R) for l in range(e)))
            counts_RR = tuple(tuple(sum(rows[s][base + d * e : base + (d + 1) * e]) for d in range(R))
                              for s in range(R))
            uniq_RM = tuple(tuple(rows[s][n * E + 1 + c * M : n * E + 1 + (c + 1) * M]) for s in range(R))
            extra.append((counts_RR, uniq_RM))
        flags = tuple(r for r in range(R) if rows[r][n * E])
        return CountTable(tuple(kept), tuple(recv), flags, tuple(extra))

    def route(self, routing: Routing, plan: CapacityPlan, num_chunks: int = 1) -> list[Chunk]:
        return route_chunks(routing, plan, self.num_experts, num_chunks, self._exchange, self.timer,
                            self.raise_on_nonfinite,
                            local_extra=lambda bounds: self._need(routing, plan, bounds))

    # -- dispatch: hop 1 in flight, then expand + hop 2 -----------------------------------
    def start_dispatch(self, x_TD: torch.Tensor, chunk: Chunk, in_flight: bool = False,
                       marks: Optional[bool] = None):
        (counts_RR, uniq_RM), need_MT = chunk.extra
        L, M, me, T = self.L, self.num_nodes, self.groups.ep_rank, chunk.num_tokens
        m, i = divmod(me, L)
        device = x_TD.device
        if (not in_flight if marks is None else marks):  # backward-time marks: the gather is in the hop
            x_TD = self.timer.mark(self.timer.mark(x_TD, "permute"), "dispatch_a2a")
        with self.timer.phase("permute"):
            uniq_send = tuple(int(u) for u in uniq_RM[me])
            rows_send = [sum(counts_RR[me][n * L : (n + 1) * L]) for n in range(M)]
            slot_MT = torch.cumsum(need_MT.to(torch.long), 0) - 1  # row of (node, token) among U
            U = sum(uniq_send)
            # Scatter each needed key to its slot; unneeded keys land in a spare last slot.
            key_U = torch.zeros(U + 1, dtype=torch.long, device=device).scatter_(
                0, torch.where(need_MT, slot_MT, torch.full_like(slot_MT, U)),
                torch.arange(need_MT.numel(), device=device))[:U]
            token_U = key_U % max(T, 1)
            x_UD = x_TD.index_select(0, token_U + chunk.start if chunk.start else token_U)
            node_S = torch.repeat_interleave(torch.arange(M, device=device),
                                             host_ints(rows_send, device),
                                             output_size=len(chunk.token_S))
            index_S = slot_MT[node_S * T + chunk.token_S] - exclusive_offsets(uniq_send, device)[node_S]
            # One side message per row: its index into the node's unique block and its
            # combine weight, as float64 (exact index below 2**53; the weight keeps its grad).
            side_S2 = torch.stack([chunk.weight_S.double(), index_S.double()], 1)
        src = [s * L + i for s in range(M)]  # the sources of my inter-node group, by node
        uniq_recv = tuple(int(uniq_RM[s][m]) for s in src)
        rows_recv = [sum(counts_RR[s][m * L : (m + 1) * L]) for s in src]
        inter = self.groups.inter_group
        # Both in flight at once: the small side message costs no extra slow-link round
        # trip (its backward, the weight gradients, likewise). Its bytes are not counted.
        with self.timer.phase("dispatch_a2a"), comm_scope(phase="dispatch_a2a"):
            side, side_ticket = start_all_to_all(side_S2, rows_recv, rows_send, inter)
        flight = send(x_UD, uniq_recv, uniq_send, inter, "dispatch_a2a", self.timer, in_flight=True)
        return flight, (side, side_ticket, rows_recv, rows_send), chunk, token_U, x_TD.dtype

    def finish_dispatch(self, pending) -> tuple[torch.Tensor, DispatchMetadata]:
        flight, (side, side_ticket, rows_recv, rows_send), chunk, token_U, dtype = pending
        (counts_RR, _), _ = chunk.extra
        L, M, me = self.L, self.num_nodes, self.groups.ep_rank
        m, i = divmod(me, L)
        device = flight.rows.device
        with self.timer.phase("dispatch_a2a"), comm_scope(phase="dispatch_a2a"):
            side_Q2 = wait_all_to_all(side, rows_recv, rows_send, self.groups.inter_group, side_ticket)
        x_VD = receive(flight, self.timer)
        with self.timer.phase("permute"):
            index_Q = side_Q2[:, 1].detach().to(torch.long) + torch.repeat_interleave(
                exclusive_offsets(flight.output_splits, device), host_ints(rows_recv, device),
                output_size=sum(rows_recv))
            weight_Q = side_Q2[:, 0].to(chunk.weight_S.dtype)
            # One gather does both the fan-out and the regroup from (source node, j)-major.
            src = [s * L + i for s in range(M)]
            sent_MJ = [[counts_RR[s][m * L + j] for j in range(L)] for s in src]
            regroup_Q = regroup_rank_to_expert(host_ints(sum(sent_MJ, []), device).view(M, L),
                                               len(index_Q))
            index_Q, weight_Q = index_Q.index_select(0, regroup_Q), weight_Q.index_select(0, regroup_Q)
            x_QD = x_VD.index_select(0, index_Q)
        intra_send = tuple(sum(sent_MJ[s][j] for s in range(M)) for j in range(L))
        got_IM = [[counts_RR[s * L + ii][me] for s in range(M)] for ii in range(L)]
        intra_recv = tuple(sum(row) for row in got_IM)
        x_ND = receive(send(x_QD, intra_recv, intra_send, self.groups.intra_group, "dispatch_a2a",
                            self.timer), self.timer)
        # Arrived (relay i', source node)-major; the flat order is (source node, i'):
        # folded into the expert-major regroup (one gather instead of two).
        to_rank_major_N = regroup_rank_to_expert(host_ints(sum(got_IM, []), device).view(L, M),
                                                 sum(intra_recv))
        x_ND, unregroup_N = regroup(x_ND, chunk.recv, self.ep_size, self.timer, to_rank_major_N)
        input_splits, output_splits, counts_local = split_sizes(chunk.kept, chunk.recv, self.ep_size)
        route = NodeRoute(token_U=token_U, uniq_send=flight.input_splits, uniq_recv=flight.output_splits,
                          index_Q=index_Q, weight_Q=weight_Q, intra_send=intra_send, intra_recv=intra_recv)
        return x_ND, DispatchMetadata(
            num_tokens=chunk.num_tokens, token_S=chunk.token_S, weight_S=chunk.weight_S,
            input_splits=input_splits, output_splits=output_splits, counts_local=counts_local,
            unregroup_N=unregroup_N, nonfinite_ranks=chunk.nonfinite_ranks, out_dtype=dtype, route=route)

    # -- combine: hop 2 back, reduce per (node, token) on the relay, hop 1 back -----------
    def start_combine(self, y_ND: torch.Tensor, meta: DispatchMetadata, in_flight: bool = False,
                      marks: Optional[bool] = None):
        r, timer = meta.route, self.timer
        y_ND = ungroup(y_ND, meta.unregroup_N, timer)
        y_QD = receive(send(y_ND, r.intra_send, r.intra_recv, self.groups.intra_group, "combine_a2a",
                            timer), timer)
        with timer.phase("unpermute"):
            acc = torch.promote_types(torch.float32, r.weight_Q.dtype)
            z_VD = torch.zeros(sum(r.uniq_recv), y_QD.shape[-1], dtype=acc, device=y_QD.device)
            z_VD = z_VD.index_add(0, r.index_Q, y_QD.to(acc) * r.weight_Q.unsqueeze(-1)).to(y_QD.dtype)
        flight = send(z_VD, r.uniq_send, r.uniq_recv, self.groups.inter_group, "combine_a2a", timer,
                      in_flight)
        return flight, meta, not in_flight if marks is None else marks

    def finish_combine(self, pending) -> torch.Tensor:
        flight, meta, marks = pending
        z_UD = receive(flight, self.timer)
        with self.timer.phase("unpermute"):
            acc = torch.promote_types(torch.float32, meta.weight_S.dtype)
            out_TD = torch.zeros(meta.num_tokens, z_UD.shape[-1], dtype=acc, device=z_UD.device)
            out_TD = out_TD.index_add(0, meta.route.token_U, z_UD.to(acc)).to(meta.out_dtype)
        return self.timer.mark(out_TD, "unpermute") if marks else out_TD


__all__ = ["HierarchicalDispatcher", "NodeRoute"]
