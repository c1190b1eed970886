"""Pure index math of permute.py against hand-derived index lists, and a full local
round trip (LocalDispatcher -> identity experts -> combine).

Pair ids are ``t * K + k`` (token-major flattening of ``[T, K]``).
"""

from __future__ import annotations

import pytest
import torch

from expert_parallel.moe.capacity import plan_capacity
from expert_parallel.moe.dispatchers.local import LocalDispatcher
from expert_parallel.moe.permute import (
    combine_rows,
    count_ids,
    inverse_permutation,
    regroup_rank_to_expert,
    sort_pairs_by_expert,
)
from expert_parallel.moe.router import Routing

T_, F_ = True, False


# ------------------------------------------------------------------ count_ids
def test_count_ids() -> None:
    assert count_ids(torch.tensor([[2, 0], [2, 3]]), 5).tolist() == [1, 0, 2, 1, 0]
    assert count_ids(torch.zeros(0, dtype=torch.int64), 3).tolist() == [0, 0, 0]


# -------------------------------------------------------- sort_pairs_by_expert
def test_sort_pairs_by_expert_hand_case() -> None:
    # T=3, K=2, E=3.  pair id: expert (kept?)
    #   t0: 0 -> e2,  1 -> e0
    #   t1: 2 -> e1,  3 -> e2 (dropped: sorts under sentinel 3)
    #   t2: 4 -> e0,  5 -> e1
    # by expert, token order within: e0 [1, 4], e1 [2, 5], e2 [0], dropped [3]
    idx_TK = torch.tensor([[2, 0], [1, 2], [0, 1]])
    kept_TK = torch.tensor([[T_, T_], [T_, F_], [T_, T_]])
    assert sort_pairs_by_expert(idx_TK, kept_TK, 3).tolist() == [1, 4, 2, 5, 0, 3]


def test_sort_pairs_is_stable_in_token_order() -> None:
    # All pairs to one expert: order must be exactly the pair ids, i.e. token order.
    idx_TK = torch.full((6, 2), 1)
    order = sort_pairs_by_expert(idx_TK, torch.ones(6, 2, dtype=torch.bool), 4)
    assert order.tolist() == list(range(12))


def test_sort_pairs_all_dropped() -> None:
    idx_TK = torch.tensor([[1, 0], [0, 1]])
    order = sort_pairs_by_expert(idx_TK, torch.zeros(2, 2, dtype=torch.bool), 2)
    assert order.tolist() == [0, 1, 2, 3]  # all under the sentinel, original order


# ------------------------------------------------------- regroup_rank_to_expert
def test_regroup_R2_e2() -> None:
    # counts[r][l] rows from source rank r for local expert l: [[1, 2], [3, 0]]
    # rank-major rows:  (r0,l0): 0 | (r0,l1): 1 2 | (r1,l0): 3 4 5 | (r1,l1): -
    # expert-major:     (r0,l0) (r1,l0) (r0,l1) (r1,l1) -> rows 0, 3 4 5, 1 2
    counts = torch.tensor([[1, 2], [3, 0]])
    regroup = regroup_rank_to_expert(counts, 6)
    assert regroup.tolist() == [0, 3, 4, 5, 1, 2]
    # inverse: inv[regroup[i]] = i
    assert inverse_permutation(regroup).tolist() == [0, 4, 5, 1, 2, 3]


def test_regroup_R3_e2_with_empty_blocks() -> None:
    # counts [[2, 0], [0, 1], [1, 1]]
    # rank-major: (0,0): 0 1 | (0,1): - | (1,0): - | (1,1): 2 | (2,0): 3 | (2,1): 4
    # expert-major: l0 -> (0,0) 0 1, (1,0) -, (2,0) 3 ; l1 -> (0,1) -, (1,1) 2, (2,1) 4
    counts = torch.tensor([[2, 0], [0, 1], [1, 1]])
    assert regroup_rank_to_expert(counts, 5).tolist() == [0, 1, 3, 2, 4]


def test_regroup_R2_e3() -> None:
    # counts [[1, 1, 1], [2, 0, 1]]
    # rank-major: (0,0) 0 | (0,1) 1 | (0,2) 2 | (1,0) 3 4 | (1,1) - | (1,2) 5
    # expert-major: l0: 0, 3 4 ; l1: 1 ; l2: 2, 5
    counts = torch.tensor([[1, 1, 1], [2, 0, 1]])
    assert regroup_rank_to_expert(counts, 6).tolist() == [0, 3, 4, 1, 2, 5]


def test_regroup_trivial_cases() -> None:
    assert regroup_rank_to_expert(torch.zeros(2, 2, dtype=torch.int64), 0).tolist() == []
    # one local expert: rank-major already is expert-major
    assert regroup_rank_to_expert(torch.tensor([[2], [1], [3]]), 6).tolist() == list(range(6))
    # one rank: blocks already expert-major
    assert regroup_rank_to_expert(torch.tensor([[2, 1, 3]]), 6).tolist() == list(range(6))


def test_regroup_moves_rows_into_expert_blocks() -> None:
    # Label every rank-major row with its (r, l) block, permute, and check the result is
    # sorted by (l, r) with rows of a block kept in their original order.
    torch.manual_seed(0)
    for R, e in [(2, 2), (3, 4), (4, 1), (1, 3)]:
        counts = torch.randint(0, 4, (R, e))
        total = int(counts.sum())
        labels = [(r, l, i) for r in range(R) for l in range(e) for i in range(int(counts[r, l]))]
        regroup = regroup_rank_to_expert(counts, total)
        permuted = [labels[j] for j in regroup.tolist()]
        assert permuted == sorted(labels, key=lambda b: (b[1], b[0], b[2]))


# -------------------------------------------------------- inverse_permutation
def test_inverse_permutation_round_trip() -> None:
    torch.manual_seed(1)
    for n in (0, 1, 7, 50):
        perm = torch.randperm(n)
        inv = inverse_permutation(perm)
        x = torch.randn(n, 3)
        assert torch.equal(x[perm][inv], x)
        assert torch.equal(x[inv][perm], x)
        assert torch.equal(perm[inv], torch.arange(n))


# ------------------------------------------------------------------ combine_rows
def test_combine_rows_hand_case() -> None:
    # y rows for (token, weight): (t1, 0.5) [1, 2]; (t0, 2) [3, 4]; (t1, 0.25) [4, 8]
    # out t0 = 2 * [3, 4] = [6, 8]; t1 = 0.5*[1,2] + 0.25*[4,8] = [1.5, 3]; t2 no pair = 0
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [4.0, 8.0]])
    out = combine_rows(y, torch.tensor([1, 0, 1]), torch.tensor([0.5, 2.0, 0.25]), 3, torch.float32)
    assert out.tolist() == [[6.0, 8.0], [1.5, 3.0], [0.0, 0.0]]


def test_combine_rows_accumulates_in_fp32() -> None:
    # bf16 has 8 significant bits: 256 + 1 rounds back to 256, so a bf16 running sum of
    # 256 followed by sixteen 1s would stay 256. fp32 accumulation gives 272, which is
    # exactly representable in bf16.
    y = torch.tensor([[256.0]] + [[1.0]] * 16, dtype=torch.bfloat16)
    token = torch.zeros(17, dtype=torch.int64)
    weight = torch.ones(17)
    out = combine_rows(y, token, weight, 1, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.item() == 272.0
    naive = torch.zeros(1, 1, dtype=torch.bfloat16)
    for row in y:
        naive = naive + row
    assert naive.item() == 256.0  # the failure mode the fp32 accumulator avoids


def test_combine_rows_gradients() -> None:
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [4.0, 8.0]], requires_grad=True)
    w = torch.tensor([0.5, 2.0, 0.25], requires_grad=True)
    out = combine_rows(y, torch.tensor([1, 0, 1]), w, 3, torch.float32)
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    (out * g).sum().backward()
    # d/dw_s = <y_s, g[token_s]>; d/dy_s = w_s * g[token_s]
    assert w.grad.tolist() == [3.0, 3.0, 12.0]
    assert y.grad.tolist() == [[0.5, 0.5], [2.0, 0.0], [0.25, 0.25]]


# ------------------------------------------------------------- local round trip
def _routing(idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int) -> Routing:
    zero = torch.zeros(())
    return Routing(
        topk_idx_TK=idx_TK,
        topk_weight_TK=weight_TK,
        probs_TE=torch.full((idx_TK.shape[0], num_experts), 1.0 / num_experts),
        aux_loss=zero,
        lb_loss=zero,
        z_loss=zero,
        nonfinite=torch.zeros((), dtype=torch.int64),
    )


def test_local_dispatch_layout_hand_case() -> None:
    # T=4, K=2, E=3, dropless. x[t] = t in every column.
    #   t0: (0, 1)  t1: (2, 0)  t2: (0, 2)  t3: (1, 0)
    # expert-major rows: e0 <- t0 t1 t2 t3 ; e1 <- t0 t3 ; e2 <- t1 t2
    idx = torch.tensor([[0, 1], [2, 0], [0, 2], [1, 0]])
    w = torch.tensor([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0], [3.0, 4.0]])
    x = torch.arange(4.0).view(4, 1).expand(4, 2).contiguous()
    routing = _routing(idx, w, 3)
    plan = plan_capacity(idx, w, 3, None)
    disp = LocalDispatcher(3)
    x_ND, meta = disp.dispatch(x, routing, plan)
    assert meta.counts_local == (4, 2, 2)
    assert x_ND[:, 0].tolist() == [0, 1, 2, 3, 0, 3, 1, 2]
    assert meta.token_S.tolist() == [0, 1, 2, 3, 0, 3, 1, 2]
    # weight of each row: e0 gets (t0,0)=.5 (t1,1)=.125 (t2,0)=1 (t3,1)=4, ...
    assert meta.weight_S.tolist() == [0.5, 0.125, 1.0, 4.0, 0.25, 3.0, 0.75, 2.0]
    out = disp.combine(x_ND, meta)
    # identity experts: out[t] = (sum of t's weights) * x[t]
    assert out[:, 0].tolist() == [0 * 0.75, 1 * 0.875, 2 * 3.0, 3 * 7.0]


def test_local_dispatch_with_drops_hand_case() -> None:
    # Same routing, capacity 2, position policy:
    #   choice 0: t0->e0 (1), t1->e2 (1), t2->e0 (2), t3->e1 (1)
    #   choice 1: t0->e1 (2), t1->e0 full, t2->e2 (2), t3->e0 full
    idx = torch.tensor([[0, 1], [2, 0], [0, 2], [1, 0]])
    w = torch.tensor([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0], [3.0, 4.0]])
    x = torch.arange(1.0, 5.0).view(4, 1)
    plan = plan_capacity(idx, w, 3, 2, "position")
    assert plan.kept_TK.tolist() == [[T_, T_], [T_, F_], [T_, T_], [T_, F_]]
    disp = LocalDispatcher(3)
    x_ND, meta = disp.dispatch(x, _routing(idx, w, 3), plan)
    assert meta.counts_local == (2, 2, 2)
    assert x_ND[:, 0].tolist() == [1, 3, 1, 4, 2, 3]
    out = disp.combine(x_ND, meta)
    # dropped pairs contribute nothing: t1 keeps only .75, t3 only 3
    assert out[:, 0].tolist() == [1 * 0.75, 2 * 0.75, 3 * 3.0, 4 * 3.0]


def test_local_round_trip_all_dropped_token_is_zero() -> None:
    idx = torch.tensor([[0], [0], [0]])
    w = torch.tensor([[0.5], [0.5], [0.5]])
    x = torch.randn(3, 4)
    plan = plan_capacity(idx, w, 2, 1, "position")
    disp = LocalDispatcher(2)
    x_ND, meta = disp.dispatch(x, _routing(idx, w, 2), plan)
    assert meta.counts_local == (1, 0)
    out = disp.combine(x_ND, meta)
    assert torch.equal(out[1:], torch.zeros(2, 4))
    torch.testing.assert_close(out[0], 0.5 * x[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_round_trip_random_identity_experts(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    T, E, K, D = 17, 5, 3, 6
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    x = torch.randn(T, D).to(dtype).requires_grad_()
    plan = plan_capacity(idx, w, E, 4, "probs")
    disp = LocalDispatcher(E)
    x_ND, meta = disp.dispatch(x, _routing(idx, w, E), plan)
    assert sum(meta.counts_local) == int(plan.kept_E.sum()) == x_ND.shape[0]
    assert list(meta.counts_local) == plan.kept_E.tolist()
    out = disp.combine(x_ND, meta)
    assert out.dtype == dtype
    kept_w = (w * plan.kept_TK).sum(-1, keepdim=True)
    expected = (kept_w * x.float()).to(dtype)
    torch.testing.assert_close(out, expected, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    # gradients: d out / d w[t,k] = sum_d x[t] for kept pairs, 0 for dropped ones
    out.float().sum().backward()
    expected_w_grad = x.detach().float().sum(-1, keepdim=True) * plan.kept_TK
    torch.testing.assert_close(w.grad, expected_w_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.float(), kept_w.detach().expand(T, D),
                               atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


def test_local_dispatch_zero_tokens() -> None:
    idx = torch.zeros(0, 2, dtype=torch.int64)
    w = torch.zeros(0, 2)
    plan = plan_capacity(idx, w, 3, None)
    disp = LocalDispatcher(3)
    x_ND, meta = disp.dispatch(torch.zeros(0, 4), _routing(idx, w, 3), plan)
    assert x_ND.shape == (0, 4) and meta.counts_local == (0, 0, 0)
    assert disp.combine(x_ND, meta).shape == (0, 4)
