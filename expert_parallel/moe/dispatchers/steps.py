"""The steps every exchanging dispatcher shares, written once.

Legend: T tokens, K choices, P = T*K pairs, E experts, R EP ranks, e = E/R local
experts, n chunks (1 unless the pipelined run cuts the tokens), S kept pairs sent,
N rows received.

Order of the steps (each sibling supplies only its count exchange and its row
exchange)::

    sort_pairs        key (chunk, expert) per kept pair, stable sort  (device, no sync)
    exchange          counts every rank needs, + each rank's NaN flag (THE host sync)
    raise_nonfinite   every EP rank raises together, before any row exchange
    split_chunks      per chunk: kept pairs (token, weight) and the agreed counts
    split_sizes       rows to / from each rank, rows per local expert  (host ints)
    send / receive    the row exchange, synchronous or in flight (async)
    regroup           rank-major -> local-expert-major (one gather)
    combine_rows      fp32 weighted scatter-add home (``moe/permute.py``)

A chunk is a contiguous slice ``[start, stop)`` of the tokens; a token's pairs all live
in its chunk, so per-chunk results are exactly the unchunked ones restricted to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ...distributed.collectives import (
    all_to_all_counts,
    all_to_all_rows,
    comm_scope,
    start_all_to_all,
    wait_all_to_all,
)
from ...profiling.host_sync import host_sync
from ..capacity import CapacityPlan
from ..permute import count_ids, host_ints, inverse_permutation, regroup_rank_to_expert
from ..router import Routing
from .base import NonFiniteRouterError


@dataclass(frozen=True)
class CountTable:
    """Host counts after the count exchange (every rank holds the same view)."""

    kept: tuple[tuple[int, ...], ...]
    """``[n][E]``: pairs this rank sends to each global expert, per chunk."""
    recv: tuple[tuple[int, ...], ...]
    """``[n][R*e]``: rows this rank receives, rank-major ``(source rank, local expert)``."""
    nonfinite_ranks: tuple[int, ...]
    """EP ranks whose router logits held NaN/Inf."""
    extra: tuple = ()
    """Per chunk, whatever else the sibling's exchange carried (hierarchical: the
    rank-to-rank and per-node tables); empty for the flat exchange."""
    peer_ints: tuple = ()
    """``[R][x]``: the ints each EP rank appended to the flat exchange (``carry``)."""


@dataclass(frozen=True)
class Chunk:
    """One chunk's kept pairs, in expert order, and the counts all ranks agreed on."""

    start: int
    stop: int
    token_S: torch.Tensor
    """Chunk-local source token of each kept pair."""
    weight_S: torch.Tensor
    """Combine weight of each kept pair (fp32, differentiable)."""
    kept: tuple[int, ...]
    recv: tuple[int, ...]
    nonfinite_ranks: tuple[int, ...]
    extra: Any = None
    """The sibling's per-chunk facts (from ``CountTable.extra`` and ``local_extra``)."""
    peer_ints: tuple = ()
    """``CountTable.peer_ints``: what every EP rank carried in the count exchange."""

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


Exchange = Callable[[torch.Tensor, torch.Tensor, Any], CountTable]
"""``exchange(kept_nE, nonfinite, local_extra) -> CountTable``: one collective (or none)
and exactly one host sync."""


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[int]:
    """``n + 1`` boundaries of ``n`` near-equal contiguous chunks (some may be empty)."""
    return [(c * num_tokens) // num_chunks for c in range(num_chunks + 1)]


def sort_pairs(routing: Routing, plan: CapacityPlan, num_experts: int,
               bounds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ids (``t * K + k``) ordered by (chunk, expert), token order inside; dropped
    pairs last. Returns ``order_P`` and ``kept_nE`` (int64, device). No host sync."""
    idx_TK, num_chunks = routing.topk_idx_TK, len(bounds) - 1
    num_tokens, k = idx_TK.shape
    key_TK = idx_TK
    if num_chunks > 1:
        edges = host_ints(bounds[1:-1], idx_TK.device)
        chunk_T = torch.bucketize(torch.arange(num_tokens, device=idx_TK.device), edges, right=True)
        key_TK = chunk_T.unsqueeze(1) * num_experts + idx_TK
    key_TK = torch.where(plan.kept_TK, key_TK, torch.full_like(idx_TK, num_chunks * num_experts))
    order_P = torch.sort(key_TK.reshape(-1), stable=True).indices
    kept_nE = count_ids(key_TK, num_chunks * num_experts + 1)[:-1].view(num_chunks, num_experts)
    return order_P, kept_nE


def exchange_flat_counts(kept_nE: torch.Tensor, nonfinite: torch.Tensor, group: Any,
                         ep_size: int, carry: Optional[torch.Tensor] = None) -> CountTable:
    """The flat count exchange over ``group``: an all-to-all of ``[R, n*e + 1]`` blocks
    (row r: what this rank sends to each of rank r's experts per chunk, then this
    rank's NaN flag), so every rank learns every peer's flag in the same collective.
    ``group=None`` (EP=1): no collective. Host sync: exactly one ``tolist``, marked with
    :func:`~expert_parallel.profiling.host_sync.host_sync`. ``carry`` (int64 ``[x]``)
    rides along to every peer (``CountTable.peer_ints``)."""
    n, num_experts = kept_nE.shape
    R, e = ep_size, num_experts // ep_size
    carry = kept_nE.new_zeros(0) if carry is None else carry.to(kept_nE.dtype).reshape(-1)
    x = carry.numel()
    if group is None:
        with host_sync("count_exchange"):
            host = torch.cat([kept_nE.reshape(-1), nonfinite.reshape(1).to(kept_nE.dtype), carry]).tolist()
        kept = [tuple(host[c * num_experts : (c + 1) * num_experts]) for c in range(n)]
        flag = host[n * num_experts]
        return CountTable(tuple(kept), tuple(kept), (0,) if flag else (),
                          peer_ints=(tuple(host[n * num_experts + 1 :]),))
    send_Rx = kept_nE.view(n, R, e).transpose(0, 1).reshape(R, n * e)
    flag_R1 = nonfinite.reshape(1, 1).expand(R, 1).to(send_Rx.dtype)
    recv_Rx = all_to_all_counts(torch.cat([send_Rx, flag_R1, carry.expand(R, x)], dim=1), group)
    with host_sync("count_exchange"):  # the one sync
        host = torch.cat([kept_nE.reshape(-1), recv_Rx.reshape(-1)]).tolist()
    mine, theirs = host[: n * num_experts], host[n * num_experts :]
    width = n * e + 1 + x
    kept = tuple(tuple(mine[c * num_experts : (c + 1) * num_experts]) for c in range(n))
    recv = tuple(tuple(theirs[r * width + c * e + l] for r in range(R) for l in range(e))
                 for c in range(n))
    flags = tuple(r for r in range(R) if theirs[r * width + n * e])
    peer = tuple(tuple(theirs[r * width + n * e + 1 : (r + 1) * width]) for r in range(R))
    return CountTable(kept, recv, flags, peer_ints=peer)


def raise_nonfinite(table: CountTable, raise_on_nonfinite: bool) -> None:
    """Every EP rank saw the same flags in the same collective, so all raise here,
    before the row exchange, and no peer is left waiting."""
    if table.nonfinite_ranks and raise_on_nonfinite:
        raise NonFiniteRouterError(
            f"router logits are NaN/Inf on EP rank(s) {list(table.nonfinite_ranks)}")


def split_chunks(order_P: torch.Tensor, table: CountTable, routing: Routing,
                 bounds: Sequence[int], local_extra: Sequence[Any] = ()) -> list[Chunk]:
    """Cut the sorted pairs into per-chunk (token, weight) lists (device slices)."""
    k = routing.topk_idx_TK.shape[1]
    weight_P = routing.topk_weight_TK.reshape(-1)
    chunks, offset = [], 0
    for c in range(len(bounds) - 1):
        size = sum(table.kept[c])
        pair_S = order_P[offset : offset + size]
        offset += size
        token_S = torch.div(pair_S, k, rounding_mode="floor")
        if bounds[c]:
            token_S = token_S - bounds[c]
        extra = (table.extra[c] if table.extra else None,
                 local_extra[c] if local_extra else None)
        chunks.append(Chunk(bounds[c], bounds[c + 1], token_S, weight_P.index_select(0, pair_S),
                            table.kept[c], table.recv[c], table.nonfinite_ranks, extra, table.peer_ints))
    return chunks


def route_chunks(routing: Routing, plan: CapacityPlan, num_experts: int, num_chunks: int,
                 exchange: Exchange, timer: Any, raise_on_nonfinite: bool,
                 local_extra: Optional[Callable[[Sequence[int]], tuple[Any, Any]]] = None) -> list[Chunk]:
    """Sort, exchange counts (the one host sync), check flags, cut into chunks.

    ``local_extra(bounds) -> (device facts per chunk, tensor riding in the exchange)``
    lets a sibling compute routing facts before the exchange (hierarchical: which
    (node, token) pairs are needed)."""
    bounds = chunk_bounds(routing.topk_idx_TK.shape[0], num_chunks)
    with timer.phase("permute"):
        order_P, kept_nE = sort_pairs(routing, plan, num_experts, bounds)
        per_chunk, rider = local_extra(bounds) if local_extra is not None else ((), None)
    # comm_scope labels a failed collective with its phase (the layer adds its name).
    with timer.phase("count_exchange"), comm_scope(phase="count_exchange"):
        table = exchange(kept_nE, routing.nonfinite, rider)
    raise_nonfinite(table, raise_on_nonfinite)
    with timer.phase("permute"):
        return split_chunks(order_P, table, routing, bounds, per_chunk)


def split_sizes(kept: Sequence[int], recv: Sequence[int], ep_size: int) -> tuple[tuple, tuple, tuple]:
    """Rows sent to / received from each EP rank and rows per local expert."""
    R = ep_size
    e = len(kept) // R
    input_splits = tuple(sum(kept[r * e : (r + 1) * e]) for r in range(R))
    output_splits = tuple(sum(recv[r * e : (r + 1) * e]) for r in range(R))
    counts_local = tuple(sum(recv[r * e + l] for r in range(R)) for l in range(e))
    return input_splits, output_splits, counts_local


def regroup(x_ND: torch.Tensor, recv: Sequence[int], ep_size: int, timer: Any,
            to_rank_major_N: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Received rows rank-major -> local-expert-major (after ``to_rank_major_N`` when the
    exchange delivered another order: both in one gather). Returns the rows and the
    inverse permutation (None when the order is already right)."""
    R = ep_size
    e = len(recv) // R
    if not ((R > 1 and e > 1) or to_rank_major_N is not None):
        return x_ND, None
    with timer.phase("permute"):
        perm_N = to_rank_major_N
        if R > 1 and e > 1:
            counts_Re = host_ints(recv, x_ND.device).view(R, e)
            expert_major_N = regroup_rank_to_expert(counts_Re, x_ND.shape[0])
            perm_N = expert_major_N if perm_N is None else perm_N[expert_major_N]
        return x_ND.index_select(0, perm_N), inverse_permutation(perm_N)


def ungroup(y_ND: torch.Tensor, unregroup_N: Optional[torch.Tensor], timer: Any) -> torch.Tensor:
    """Undo :func:`regroup` on the expert outputs."""
    if unregroup_N is None:
        return y_ND
    with timer.phase("unpermute"):
        return y_ND.index_select(0, unregroup_N)


@dataclass(frozen=True)
class InFlight:
    """A row exchange issued by :func:`send`; :func:`receive` completes it."""

    rows: torch.Tensor
    """The result (synchronous) or the receive buffer (in flight)."""
    ticket: Any
    output_splits: tuple[int, ...]
    input_splits: tuple[int, ...]
    group: Any
    phase: str


def send(x_SD: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
         group: Any, phase: str, timer: Any, in_flight: bool = False) -> InFlight:
    """Issue the variable-split, differentiable row all-to-all over ``group``, counting
    its bytes. ``in_flight``: start it asynchronously (complete with :func:`receive`).
    ``group=None`` (one rank): no communication. Splits are host ints; no sync."""
    out_s, in_s = tuple(output_splits), tuple(input_splits)
    if group is None:
        return InFlight(x_SD, None, out_s, in_s, None, phase)
    row_bytes = x_SD.element_size() * (x_SD.shape[-1] if x_SD.dim() > 1 else 1)
    timer.add_bytes(phase, sum(in_s) * row_bytes, sum(out_s) * row_bytes)
    with timer.phase(phase), comm_scope(phase=phase):
        if in_flight:
            buf, ticket = start_all_to_all(x_SD, out_s, in_s, group)
            return InFlight(buf, ticket, out_s, in_s, group, phase)
        return InFlight(all_to_all_rows(x_SD, out_s, in_s, group), None, out_s, in_s, group, phase)


def receive(flight: InFlight, timer: Any) -> torch.Tensor:
    """The rows of a :func:`send` (waits when it is in flight)."""
    if flight.ticket is None:
        return flight.rows
    with timer.phase(flight.phase), comm_scope(phase=flight.phase):
        return wait_all_to_all(flight.rows, flight.output_splits, flight.input_splits,
                               flight.group, flight.ticket)


__all__ = ["CountTable", "Chunk", "InFlight", "chunk_bounds", "sort_pairs", "exchange_flat_counts",
           "raise_nonfinite", "split_chunks", "route_chunks", "split_sizes", "regroup", "ungroup",
           "send", "receive"]
