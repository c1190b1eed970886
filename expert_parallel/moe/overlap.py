"""Communication/computation overlap: pipeline token chunks through the all-to-all.

Legend: T tokens, K choices, E experts, e local experts, R EP ranks, n chunks.

The local tokens are cut into n contiguous chunks. One count exchange (one host sync)
tells every rank the per-chunk splits; then chunk c's dispatch all-to-all is *started*
asynchronously, the experts compute chunk c-1 while it flies, and each chunk's combine
all-to-all is also started asynchronously and only waited for at the end::

    start D0  start D1  wait D0  experts(0)  start C0  wait D1  experts(1)  start C1 ...
    wait C0  combine(0)  wait C1  combine(1)

The backward overlaps the same way without extra code: each wait node starts the reverse
exchange in its backward and the matching start node waits for it, and autograd runs
ready nodes latest-created first, so chunk c's expert backward runs while chunk c-1's
gradients are in flight. Every chunk's rows are a subset of the plain path's rows, and
a token's pairs all live in one chunk, so results equal the plain path.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..distributed.collectives import all_to_all_counts, comm_scope, start_all_to_all, wait_all_to_all
from .capacity import CapacityPlan
from .dispatcher import AllToAllDispatcher, NonFiniteRouterError
from .permute import count_ids, inverse_permutation, regroup_rank_to_expert
from .router import Routing


class OverlappedAllToAllDispatcher(AllToAllDispatcher):
    """The flat all-to-all dispatcher with an n-chunk pipelined ``run`` (n >= 2)."""

    def __init__(self, num_experts: int, group: Any, ep_size: int, num_chunks: int,
                 raise_on_nonfinite: bool = True) -> None:
        super().__init__(num_experts, group, ep_size, raise_on_nonfinite=raise_on_nonfinite)
        self.num_chunks = num_chunks

    def run(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan,
            experts: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]) -> torch.Tensor:
        """dispatch -> experts -> combine for all chunks, pipelined. Returns out_TD."""
        num_tokens, k = routing.topk_idx_TK.shape
        E, R, e, n = self.num_experts, self.ep_size, self.num_local, self.num_chunks
        device, timer = x_TD.device, self.timer
        with timer.phase("permute"):
            bounds = [(c * num_tokens) // n for c in range(n + 1)]
            chunk_T = torch.bucketize(torch.arange(num_tokens, device=device),
                                      torch.tensor(bounds[1:-1], device=device), right=True)
            chunk_TK = chunk_T.unsqueeze(1).expand(-1, k)
            key_TK = torch.where(plan.kept_TK, chunk_TK * E + routing.topk_idx_TK,
                                 torch.full_like(routing.topk_idx_TK, n * E))
            order_P = torch.sort(key_TK.reshape(-1), stable=True).indices
            kept_nE = count_ids(key_TK, n * E + 1)[: n * E].view(n, E)
        with timer.phase("count_exchange"), comm_scope(phase="count_exchange"):
            # [R, n*e + 1]: for destination rank r, per chunk, per local expert; + my flag.
            send = kept_nE.view(n, R, e).transpose(0, 1).reshape(R, n * e)
            flag = routing.nonfinite.reshape(1, 1).expand(R, 1).to(send.dtype)
            recv = all_to_all_counts(torch.cat([send, flag], 1), self.group)
            host = torch.cat([kept_nE.reshape(-1), recv.reshape(-1)]).tolist()  # the one sync
        kept_host, recv_host = host[: n * E], host[n * E :]
        flags = [recv_host[r * (n * e + 1) + n * e] for r in range(R)]
        if any(flags) and self.raise_on_nonfinite:
            raise NonFiniteRouterError(
                f"router logits are NaN/Inf on EP rank(s) {[r for r, f in enumerate(flags) if f]}")

        def got(r: int, c: int, l: int) -> int:
            return recv_host[r * (n * e + 1) + c * e + l]

        starts, offset = [], 0
        for c in range(n):
            starts.append(offset)
            offset += sum(kept_host[c * E : (c + 1) * E])
        chunks = []
        for c in range(n):  # start every dispatch exchange
            with timer.phase("permute"):
                size = sum(kept_host[c * E : (c + 1) * E])
                pair_S = order_P[starts[c] : starts[c] + size]
                token_S = torch.div(pair_S, k, rounding_mode="floor")
                weight_S = routing.topk_weight_TK.reshape(-1).index_select(0, pair_S)
                x_SD = x_TD.index_select(0, token_S)
            in_splits = [sum(kept_host[c * E + r * e : c * E + (r + 1) * e]) for r in range(R)]
            out_splits = [sum(got(r, c, l) for l in range(e)) for r in range(R)]
            row_bytes = x_SD.element_size() * x_SD.shape[-1]
            timer.add_bytes("dispatch_a2a", sum(in_splits) * row_bytes, sum(out_splits) * row_bytes)
            with timer.phase("dispatch_a2a"), comm_scope(phase="dispatch_a2a"):
                buf, ticket = start_all_to_all(x_SD, out_splits, in_splits, self.group)
            chunks.append((token_S, weight_S, in_splits, out_splits, buf, ticket))
        pending = []
        for c, (token_S, weight_S, in_splits, out_splits, buf, ticket) in enumerate(chunks):
            with timer.phase("dispatch_a2a"), comm_scope(phase="dispatch_a2a"):
                x_ND = wait_all_to_all(buf, out_splits, in_splits, self.group, ticket)
            counts_Re = [[got(r, c, l) for l in range(e)] for r in range(R)]
            counts_local = [sum(counts_Re[r][l] for r in range(R)) for l in range(e)]
            with timer.phase("permute"):
                regroup_N = regroup_rank_to_expert(torch.tensor(counts_Re, device=device), sum(out_splits))
                x_ND = x_ND.index_select(0, regroup_N)
            with timer.phase("experts"):
                y_ND = experts(x_ND, counts_local)
            with timer.phase("unpermute"):
                y_ND = y_ND.index_select(0, inverse_permutation(regroup_N))
            row_bytes = y_ND.element_size() * y_ND.shape[-1]
            timer.add_bytes("combine_a2a", sum(out_splits) * row_bytes, sum(in_splits) * row_bytes)
            with timer.phase("combine_a2a"), comm_scope(phase="combine_a2a"):
                back, ticket2 = start_all_to_all(y_ND, in_splits, out_splits, self.group)
            pending.append((token_S, weight_S, in_splits, out_splits, back, ticket2))
        out_TD = torch.zeros(num_tokens, x_TD.shape[-1], dtype=torch.float32, device=device)
        for token_S, weight_S, in_splits, out_splits, back, ticket2 in pending:
            with timer.phase("combine_a2a"), comm_scope(phase="combine_a2a"):
                y_SD = wait_all_to_all(back, in_splits, out_splits, self.group, ticket2)
            with timer.phase("unpermute"):
                # Same fp32 weighted scatter-add as permute.combine_rows, into one buffer.
                out_TD = out_TD.index_add(0, token_S, y_SD.float() * weight_S.unsqueeze(-1))
        return out_TD.to(x_TD.dtype)
