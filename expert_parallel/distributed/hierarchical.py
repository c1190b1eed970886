"""Two-level (hierarchical) all-to-all: inside a node, then across nodes.

Legend: R EP ranks = M nodes x L ranks per node; rank ``(m, i)`` has EP index ``m*L + i``.
``counts_RR[s, d]`` = rows EP rank s sends to EP rank d (every rank knows the whole
matrix after one all-gather).

A flat all-to-all sends R-1 messages per rank, M-1 of every L of them across the slow
inter-node link. The two-level exchange sends each rank's data in two hops:

1. **intra-node** (group = the L ranks of this node): rank (m, i) sends to (m, j) every
   row destined for *any* node's local index j. Send layout: rows regrouped from
   destination-rank-major ``(m', j)`` to ``(j, m')``.
2. **inter-node** (group = the M ranks with local index j, one per node): rank (m, j)
   now holds, for each destination node m', the rows of all L sources of its node; it
   sends them as one aggregated message per node pair. Before sending, the received
   blocks ``(source i, m')`` are regrouped to ``(m', i)``.

What arrives at (m', j) is ordered by source node, then source local index: exactly the
source-rank-major order of the flat all-to-all, so the result is identical. Both hops
are :func:`all_to_all_rows` (differentiable), and the regroups are index_selects, so the
backward is the same two hops reversed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..moe.permute import regroup_rank_to_expert
from .collectives import all_to_all_rows


def hierarchical_all_to_all(
    x_SD: torch.Tensor,
    counts_RR: Sequence[Sequence[int]],
    me: int,
    ranks_per_node: int,
    intra_group: Any,
    inter_group: Any,
) -> torch.Tensor:
    """Rows of ``x_SD`` (destination-rank-major, ``counts_RR[me][d]`` rows for EP rank d)
    end up on their destinations, ordered source-rank-major. Host ints only (no sync)."""
    L = ranks_per_node
    R = len(counts_RR)
    M = R // L
    m, i = divmod(me, L)
    device = x_SD.device

    # Hop 1: regroup my rows (m', j)-major -> (j, m')-major and send block j to (m, j).
    mine_MJ = torch.tensor([[counts_RR[me][mp * L + j] for j in range(L)] for mp in range(M)],
                           device=device, dtype=torch.long)
    x_SD = x_SD.index_select(0, regroup_rank_to_expert(mine_MJ, x_SD.shape[0]))
    send1 = [sum(counts_RR[me][mp * L + j] for mp in range(M)) for j in range(L)]
    recv1 = [sum(counts_RR[m * L + src][mp * L + i] for mp in range(M)) for src in range(L)]
    x_ND = all_to_all_rows(x_SD, recv1, send1, intra_group)

    # Hop 2: blocks arrived (source i', m')-major; regroup to (m', i') and send block m'.
    got_IM = torch.tensor([[counts_RR[m * L + src][mp * L + i] for mp in range(M)] for src in range(L)],
                          device=device, dtype=torch.long)
    x_ND = x_ND.index_select(0, regroup_rank_to_expert(got_IM, x_ND.shape[0]))
    send2 = [sum(counts_RR[m * L + src][mp * L + i] for src in range(L)) for mp in range(M)]
    recv2 = [sum(counts_RR[ms * L + src][me] for src in range(L)) for ms in range(M)]
    return all_to_all_rows(x_ND, recv2, send2, inter_group)
