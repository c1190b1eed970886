"""Pure index math for moving tokens between layouts. No communication.

Legend: T tokens, D model dim, K choices, P = T*K pairs, S kept pairs on the sending
side, N rows received by this rank, R EP ranks, e local experts per rank.

Layouts::

    token order       x_TD                       the layer's input
    expert-sorted     x_SD  = x_TD[token_S]      kept pairs sorted by global expert;
                                                 since rank r owns experts [r*e,(r+1)*e)
                                                 this is also destination-rank-major
    rank-major        x_ND  (after all-to-all)   blocks (source rank r, local expert l)
                                                 ordered r-major: (0,0),(0,1)..(1,0)..
    expert-major      x_ND[regroup_N]            the same blocks ordered l-major:
                                                 (0,0),(1,0)..(0,1).. so each local
                                                 expert's rows are contiguous

Everything is O(T*K) or O(N) memory: no dense tokens x experts x capacity tensor.
"""

from __future__ import annotations

import torch


def count_ids(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``bincount`` with a fixed number of bins and no host sync.

    ``torch.bincount`` reads the maximum id back to the host on CUDA to size its output;
    a scatter-add into ``num_bins`` zeros does not. Ids must lie in ``[0, num_bins)``.
    """
    ids = ids.reshape(-1)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int64))


def sort_pairs_by_expert(
    topk_idx_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Pair ids (``t * K + k``) ordered by expert, token order within an expert.

    Dropped pairs go last (they sort under the sentinel expert ``num_experts``), so the
    first ``S = kept.sum()`` entries are exactly the kept pairs.
    """
    key_P = torch.where(kept_TK, topk_idx_TK, torch.full_like(topk_idx_TK, num_experts))
    return torch.sort(key_P.reshape(-1), stable=True).indices


def regroup_rank_to_expert(counts_Re: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that turn received rows from rank-major into local-expert-major.

    ``counts_Re[r, l]`` rows arrived from source rank ``r`` for local expert ``l``;
    ``total`` is their sum (a host int, known after the count exchange).
    Returns ``regroup_N`` with ``x_expert_major = x_rank_major[regroup_N]``.
    """
    num_ranks, num_local = counts_Re.shape
    device = counts_Re.device
    block_rank_major = torch.arange(num_ranks * num_local, device=device)
    block_of_row_N = torch.repeat_interleave(
        block_rank_major, counts_Re.reshape(-1), output_size=total
    )
    # Block (r, l) has rank-major id r*e + l and expert-major key l*R + r.
    key_N = (block_of_row_N % num_local) * num_ranks + block_of_row_N // num_local
    return torch.sort(key_N, stable=True).indices


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    inv_N = torch.empty_like(perm_N)
    inv_N[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
    return inv_N


def node_need(
    topk_idx_TK: torch.Tensor, kept_TK: torch.Tensor, experts_per_node: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (node, token) pairs have at least one kept row (hierarchical exchange).

    Returns ``need_MT`` (bool, flattened ``[M*T]``, node-major) and ``uniq_M`` (int64,
    distinct tokens this rank sends to each node). No host sync.
    """
    num_tokens = topk_idx_TK.shape[0]
    node_TK = torch.div(topk_idx_TK, experts_per_node, rounding_mode="floor")
    # Dropped pairs may name any expert; they add 0 to the count.
    key_P = (node_TK * num_tokens + torch.arange(num_tokens, device=node_TK.device).unsqueeze(1)).reshape(-1)
    hits = torch.zeros(num_nodes * num_tokens, dtype=torch.int64, device=node_TK.device)
    hits.index_add_(0, key_P, kept_TK.reshape(-1).to(torch.int64))
    need_MT = hits > 0
    return need_MT, need_MT.view(num_nodes, num_tokens).sum(1)


def host_ints(values, device: torch.device) -> torch.Tensor:
    """Host ints (split sizes, counts) as an int64 tensor on ``device``, with no host sync.

    ``torch.tensor(list, device=cuda)`` copies from pageable memory and then waits for the
    stream (``cudaStreamSynchronize``: a sync, which ``set_sync_debug_mode`` flags). On
    CUDA the values are staged in pinned memory and copied asynchronously instead; the
    caching host allocator keeps the staging buffer alive until the copy has run.
    """
    if device.type != "cuda":
        return torch.tensor(list(values), dtype=torch.long, device=device)
    staged = torch.tensor(list(values), dtype=torch.long, pin_memory=True)
    return staged.to(device, non_blocking=True)


def exclusive_offsets(sizes, device: torch.device) -> torch.Tensor:
    """``[0, s0, s0+s1, ...]`` (one per size) of host ints, as a device tensor."""
    starts, total = [], 0
    for s in sizes:
        starts.append(total)
        total += s
    return host_ints(starts, device)


def combine_rows(
    y_SD: torch.Tensor,
    token_S: torch.Tensor,
    weight_S: torch.Tensor,
    num_tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``out[t] = sum over kept pairs of t of weight * y``, accumulated in fp32 (or in the
    weights' precision when that is wider)."""
    acc = torch.promote_types(torch.float32, weight_S.dtype)  # fp64 with an fp64 router
    out_TD = torch.zeros(num_tokens, y_SD.shape[-1], dtype=acc, device=y_SD.device)
    out_TD = out_TD.index_add(0, token_S, y_SD.to(acc) * weight_S.unsqueeze(-1))
    return out_TD.to(out_dtype)
