"""Two-level (hierarchical) exchange with per-node token de-duplication.

Legend: T tokens on this rank, D model dim, R EP ranks = M nodes x L ranks per node;
rank ``(m, i)`` has EP index ``m*L + i``. S kept (token, expert) rows this rank sends,
U unique (destination node, token) pairs this rank sends, V unique rows received over
the inter-node hop, Q (token, expert) rows those expand to, N rows this rank's experts
receive. ``counts_RR[s][d]`` = rows EP rank s sends to EP rank d and ``uniq_RM[s][n]`` =
distinct tokens EP rank s sends to node n; every rank knows both tables after the
dispatcher's one count exchange (an all-gather), so every split below is a host int.

Why two hops: on a cluster the inter-node link is several times slower than the
node-local one. A flat all-to-all sends a token across it once per *expert* it picks on
a remote node; here it crosses once per remote *node* (the DeepEP idea), and is fanned
out to that node's ranks over the fast link. With top-k routing and several experts per
node that removes a large share of the slow-link bytes (``benchmarks/cluster_model.py``
predicts how much at scale).

Dispatch (rank (m, i))::

    hop 1  inter-node, group = the M ranks with local index i (one per node):
           unique tokens x_UD, node-major (ascending token within a node)  -> (n, i)
           + per row: its index into that node's unique block, and its combine weight
    expand on (n, i): x_QD = x_VD[index]; rows ordered (source node, dest local j, ...)
           regrouped to (j, source node)-major
    hop 2  intra-node, group = the L ranks of node n: block j -> (n, j)
    on (n, j): blocks arrive (source local i', source node)-major; regrouped to
           (source node, i') = source-rank-major, the order the flat exchange produces.

Combine runs the hops backwards and *reduces* instead of copying: on (n, i) the weighted
expert outputs of a token's rows are summed into one row per (node, token), which crosses
the slow link once and is summed over nodes at home. So forward and backward cross the
slow link with U rows instead of S. All steps are differentiable (index_select /
index_add / :func:`all_to_all_rows`); autograd reverses them.

Numerics: the same products as the flat combine, summed per node first, so results equal
the flat path up to fp32 summation order; partial sums travel in the expert output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..moe.permute import regroup_rank_to_expert
from .collectives import all_to_all_rows, start_all_to_all, wait_all_to_all

@dataclass(frozen=True)
class NodeRoute:
    """Everything the hierarchical combine needs to undo the dispatch (immutable)."""

    token_U: torch.Tensor
    """Source token of each unique (node, token) row this rank sent, node-major."""
    uniq_send: tuple[int, ...]
    """Unique rows this rank sent to each node (hop 1 input splits)."""
    uniq_recv: tuple[int, ...]
    """Unique rows this rank received from each source node (hop 1 output splits)."""
    index_Q: torch.Tensor
    """For each row the relay sends in hop 2 (local index j-major), its row in the block
    of unique rows it received in hop 1."""
    weight_Q: torch.Tensor
    """Combine weight of each of those rows (fp32, carries the router gradient)."""
    intra_send: tuple[int, ...]
    """Rows the relay rank sends to each node-local rank (hop 2 input splits)."""
    intra_recv: tuple[int, ...]
    """Rows this rank receives from each node-local relay (hop 2 output splits)."""
    to_rank_major_N: torch.Tensor
    """Source-rank-major row n is hop-2 arrival row ``to_rank_major_N[n]``."""


def node_need(
    topk_idx_TK: torch.Tensor, kept_TK: torch.Tensor, experts_per_node: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (node, token) pairs have at least one kept row. No communication, no sync.

    Returns ``need_MT`` (bool, flattened ``[M*T]``, node-major) and ``uniq_M`` (int64,
    distinct tokens this rank sends to each node), which rides in the count exchange.
    """
    num_tokens = topk_idx_TK.shape[0]
    node_TK = torch.div(topk_idx_TK, experts_per_node, rounding_mode="floor")
    # Dropped pairs may name any expert; they add 0 to the count.
    key_P = (node_TK * num_tokens + torch.arange(num_tokens, device=node_TK.device).unsqueeze(1)).reshape(-1)
    hits = torch.zeros(num_nodes * num_tokens, dtype=torch.int64, device=node_TK.device)
    hits.index_add_(0, key_P, kept_TK.reshape(-1).to(torch.int64))
    need_MT = hits > 0
    return need_MT, need_MT.view(num_nodes, num_tokens).sum(1)


def _offsets(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    starts, total = [], 0
    for s in sizes:
        starts.append(total)
        total += s
    return torch.tensor(starts, dtype=torch.long, device=device)


def hierarchical_dispatch(
    x_TD: torch.Tensor,
    token_S: torch.Tensor,
    weight_S: torch.Tensor,
    need_MT: torch.Tensor,
    counts_RR: Sequence[Sequence[int]],
    uniq_RM: Sequence[Sequence[int]],
    me: int,
    ranks_per_node: int,
    intra_group: Any,
    inter_group: Any,
) -> tuple[torch.Tensor, NodeRoute]:
    """Send the kept rows (``token_S``, expert-sorted, so destination-rank-major) to their
    experts' ranks. Returns the rows this rank receives, in hop-2 arrival order, and the
    :class:`NodeRoute`; ``x_ND[route.to_rank_major_N]`` is the source-rank-major order the
    flat all-to-all delivers."""
    L, R = ranks_per_node, len(counts_RR)
    M = R // L
    m, i = divmod(me, L)
    T = x_TD.shape[0]
    device = x_TD.device

    # -- on the source: one row per (destination node, token) ------------------------------
    uniq_send = tuple(int(u) for u in uniq_RM[me])
    rows_send = [sum(counts_RR[me][n * L : (n + 1) * L]) for n in range(M)]
    slot_MT = torch.cumsum(need_MT.to(torch.long), 0) - 1  # row of (node, token) among U
    U = sum(uniq_send)
    # Scatter each needed key to its slot; unneeded keys land in a spare last slot.
    key_U = torch.zeros(U + 1, dtype=torch.long, device=device).scatter_(
        0, torch.where(need_MT, slot_MT, torch.full_like(slot_MT, U)),
        torch.arange(need_MT.numel(), device=device))[:U]
    token_U = key_U % max(T, 1)
    x_UD = x_TD.index_select(0, token_U)
    node_S = torch.repeat_interleave(torch.arange(M, device=device),
                                     torch.tensor(rows_send, device=device), output_size=len(token_S))
    index_S = slot_MT[node_S * T + token_S] - _offsets(uniq_send, device)[node_S]
    # One side message per row: its index into the node's unique block and its combine
    # weight, both as float64 (exact for any index below 2**53; the weight keeps its grad).
    side_S2 = torch.stack([weight_S.double(), index_S.double()], 1)

    # -- hop 1: across nodes, to the rank with my local index --------------------------------
    src = [s * L + i for s in range(M)]  # the sources of my inter-node group, by node
    uniq_recv = tuple(int(uniq_RM[s][m]) for s in src)
    rows_recv = [sum(counts_RR[s][m * L : (m + 1) * L]) for s in src]
    # Both exchanges in flight at once: the small side message costs no extra round trip
    # on the slow link (its backward, the weight gradients, likewise).
    side_Q2, side_ticket = start_all_to_all(side_S2, rows_recv, rows_send, inter_group)
    x_VD, x_ticket = start_all_to_all(x_UD, uniq_recv, uniq_send, inter_group)
    side_Q2 = wait_all_to_all(side_Q2, rows_recv, rows_send, inter_group, side_ticket)
    x_VD = wait_all_to_all(x_VD, uniq_recv, uniq_send, inter_group, x_ticket)
    index_Q = side_Q2[:, 1].detach().to(torch.long) + torch.repeat_interleave(
        _offsets(uniq_recv, device), torch.tensor(rows_recv, device=device), output_size=sum(rows_recv))
    weight_Q = side_Q2[:, 0].float()

    # -- expand on the relay, in hop-2 send order: (j, source node)-major ---------------------
    # One gather does both the fan-out and the regroup from (source node, j)-major.
    sent_MJ = [[counts_RR[s][m * L + j] for j in range(L)] for s in src]
    regroup_Q = regroup_rank_to_expert(torch.tensor(sent_MJ, device=device, dtype=torch.long), len(index_Q))
    index_Q, weight_Q = index_Q.index_select(0, regroup_Q), weight_Q.index_select(0, regroup_Q)
    x_QD = x_VD.index_select(0, index_Q)

    # -- hop 2: inside the node --------------------------------------------------------------
    intra_send = tuple(sum(sent_MJ[s][j] for s in range(M)) for j in range(L))
    got_IM = [[counts_RR[s * L + ii][me] for s in range(M)] for ii in range(L)]
    intra_recv = tuple(sum(row) for row in got_IM)
    x_ND = all_to_all_rows(x_QD, intra_recv, intra_send, intra_group)
    # Arrived (relay i', source node)-major; the flat order is (source node, i'). The
    # caller folds this permutation into its own regroup (one gather instead of two).
    to_rank_major_N = regroup_rank_to_expert(torch.tensor(got_IM, device=device, dtype=torch.long),
                                             sum(intra_recv))
    route = NodeRoute(token_U=token_U, uniq_send=uniq_send, uniq_recv=uniq_recv, index_Q=index_Q,
                      weight_Q=weight_Q, intra_send=intra_send, intra_recv=intra_recv,
                      to_rank_major_N=to_rank_major_N)
    return x_ND, route


def hierarchical_combine(
    y_ND: torch.Tensor,
    route: NodeRoute,
    num_tokens: int,
    out_dtype: torch.dtype,
    intra_group: Any,
    inter_group: Any,
) -> torch.Tensor:
    """Bring expert outputs (in hop-2 arrival order, as dispatched) home: back inside the
    node, weighted and summed per (node, token) on the relay, back across nodes, summed
    per token in fp32. Returns ``out_TD`` in ``out_dtype``."""
    y_QD = all_to_all_rows(y_ND, route.intra_send, route.intra_recv, intra_group)
    z_VD = torch.zeros(sum(route.uniq_recv), y_QD.shape[-1], dtype=torch.float32, device=y_QD.device)
    z_VD = z_VD.index_add(0, route.index_Q, y_QD.float() * route.weight_Q.unsqueeze(-1)).to(y_QD.dtype)
    z_UD = all_to_all_rows(z_VD, route.uniq_send, route.uniq_recv, inter_group)
    out_TD = torch.zeros(num_tokens, z_UD.shape[-1], dtype=torch.float32, device=z_UD.device)
    return out_TD.index_add(0, route.token_U, z_UD.float()).to(out_dtype)
