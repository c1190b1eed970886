"""The multi-rank code paths in one process, at EP=4 and EP=8, over the mirror group.

``expert_parallel.distributed.fake_group.fake_world`` makes this process rank r of an
N-rank job whose peers all behave like it (same tokens, same routing). Every
dispatcher then runs its real multi-rank path -- count exchange, split arithmetic,
regroup, metadata, every collective -- with no peer process. What is checked:

* the mirror group's own semantics (so the checks below rest on something known);
* per dispatcher, layouts derived by hand in the mirror world: the rows each rank's
  experts receive, in local-expert-major order, the splits and the metadata; the
  hierarchical exchange delivers exactly what the flat one does; chunked (overlap)
  splits add up to the unchunked ones;
* per dispatcher x router, a whole layer forward + backward: the exchanges it issues
  (dispatch-direction exchanges consistent with the count exchange, every reverse
  exchange the forward one with its splits swapped), exactly one host read per forward
  inside the marked count-exchange region (none for static shapes), none in backward;
* every tensor the data path creates names its device, and no host data reaches the
  device outside ``permute.host_ints`` (``profiling.host_sync.audit_host_traffic``).

Values are never compared against a reference: a mirror world is not a real job.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.distributed.fake_group import FakeSplitError, fake_world
from expert_parallel.moe.capacity import plan_capacity
from expert_parallel.moe.dispatchers.steps import split_sizes
from expert_parallel.moe.router import Routing
from expert_parallel.profiling.host_sync import HOST_SYNCS, audit_host_traffic

E, D, T, K = 16, 8, 11, 2
EP_RANKS = [(4, 1), (4, 3), (8, 0), (8, 5)]  # (EP size = world size, this rank)

# name -> (config overrides, ParallelGroups.build kwargs)
MODES: dict[str, tuple[dict, dict]] = {
    "flat": ({}, {}),
    "overlap": ({"overlap_chunks": 3}, {}),
    "hierarchical": ({"a2a_algorithm": "hierarchical"}, {"ranks_per_node": 2}),
    "hierarchical_l1": ({"a2a_algorithm": "hierarchical"}, {"ranks_per_node": 1}),
    "hierarchical_overlap": ({"a2a_algorithm": "hierarchical", "overlap_chunks": 2}, {"ranks_per_node": 2}),
    "static": ({"static_shapes": True, "eval_capacity_factor": 1.25, "nonfinite_policy": "count"}, {}),
}
ROUTERS: dict[str, dict] = {
    "softmax_topk": {},
    "switch": {"top_k": 1},
    "sigmoid_topk": {"bias_update_rate": 0.01},
    "noisy_topk": {},
    "top_p": {"top_p": 0.5, "top_k": 3},
    "expert_choice": {"eval_capacity_factor": 1.25},
}


# -- the mirror group itself ---------------------------------------------------------
def test_mirror_semantics() -> None:
    with fake_world(4, rank=2) as world:
        g = dist.new_group([0, 1, 2, 3])
        x = torch.arange(10.0).view(5, 2)
        # Dispatch direction: every peer sends what this rank sends itself (block 2).
        out = torch.empty(4 * 1, 2)
        dist.all_to_all_single(out, x, [1, 1, 1, 1], [2, 1, 1, 1], group=g)
        assert torch.equal(out, x[3:4].expand(4, 2))
        # Splits no peer data can be consistent with: the input's rows, cyclically.
        out = torch.empty(7, 2)
        dist.all_to_all_single(out, x[:4], [2, 3, 1, 1], [1, 1, 1, 1], group=g)
        assert torch.equal(out, x[torch.tensor([0, 1, 2, 3, 0, 1, 2])])
        assert [c.mode for c in world.of_kind("all_to_all_single")] == ["mirror", "tile"]
        # Equal splits, async: the same, completed at once.
        out = torch.empty(4, 2)
        dist.all_to_all_single(out, x[:4], group=g, async_op=True).wait()
        assert torch.equal(out, x[2:3].expand(4, 2))
        parts = [torch.empty(3) for _ in range(4)]
        dist.all_gather(parts, torch.tensor([1.0, 2.0, 3.0]), group=g)
        assert all(torch.equal(p, torch.tensor([1.0, 2.0, 3.0])) for p in parts)
        t = torch.tensor([1.5, 2.0])
        dist.all_reduce(t, group=g)
        assert torch.equal(t, torch.tensor([6.0, 8.0]))
        t = torch.tensor([1.5, 2.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
        assert torch.equal(t, torch.tensor([1.5, 2.0]))
        objs: list[Any] = [None] * 4
        dist.all_gather_object(objs, {"a": 1}, group=g)
        assert objs == [{"a": 1}] * 4
        with pytest.raises(FakeSplitError, match=r"input splits \[1, 1, 1, 1\] do not match 5 rows"):
            dist.all_to_all_single(torch.empty(4, 2), x, [1, 1, 1, 1], [1, 1, 1, 1], group=g)
        with pytest.raises(RuntimeError, match="already initialised"):
            with fake_world(2):
                pass
    assert not dist.is_initialized()  # torn down, also after the errors above


def test_fake_world_validates_arguments() -> None:
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 4\), got 4"):
        with fake_world(4, rank=4):
            pass
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        with fake_world(0):
            pass
    assert not dist.is_initialized()


# -- dispatchers: layouts derived by hand in the mirror world ------------------------
def _routing(capacity: int | None) -> tuple[Routing, Any]:
    """Token t picks experts 3t and 5t+7 (mod 16): distinct, spread over all ranks."""
    idx_TK = torch.tensor([[(3 * t) % E, (5 * t + 7) % E] for t in range(T)])
    weight_TK = torch.rand(T, K, generator=torch.Generator().manual_seed(3)) + 0.1
    zero = torch.zeros(())
    routing = Routing(topk_idx_TK=idx_TK, topk_weight_TK=weight_TK, probs_TE=torch.full((T, E), 1.0 / E),
                      aux_loss=zero, lb_loss=zero, z_loss=zero, nonfinite=torch.zeros((), dtype=torch.int64))
    return routing, plan_capacity(idx_TK, weight_TK, E, capacity)


def _kept_tokens(plan: Any, expert: int) -> list[int]:
    """Tokens whose kept pair chose ``expert``, in token order (the dispatch order)."""
    idx = _routing(None)[0].topk_idx_TK
    return [t for t in range(T) for k in range(K) if idx[t, k] == expert and plan.kept_TK[t, k]]


def _layer(ep: int, overrides: dict, group_kwargs: dict, **cfg: Any) -> MoELayer:
    groups = ParallelGroups.build(ep, **group_kwargs)
    base = dict(hidden_size=D, ffn_hidden_size=12, num_experts=E, top_k=K, capacity_factor=1.0)
    base.update(cfg)
    base.update(overrides)
    return MoELayer(MoEConfig(**base), groups, seed=1)


@pytest.mark.parametrize("capacity", [None, 1])
@pytest.mark.parametrize("ep,rank", EP_RANKS)
def test_flat_and_hierarchical_dispatch_layout(ep: int, rank: int, capacity: int | None) -> None:
    R, e = ep, E // ep
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
    routing, plan = _routing(capacity)
    if capacity is not None:
        assert not bool(plan.kept_TK.all())  # the capacity case really drops
    mine = [_kept_tokens(plan, rank * e + l) for l in range(e)]
    # Rows of a rank's experts, local-expert-major: expert l's rows from every source
    # rank r -- in a mirror world all of them copies of this rank's own rows for l.
    want = torch.cat([x[torch.tensor(mine[l], dtype=torch.long)] for l in range(e) for _ in range(R)])
    sent = tuple(sum(len(_kept_tokens(plan, d * e + l)) for l in range(e)) for d in range(R))
    with fake_world(ep, rank) as world:
        flat = _layer(ep, {}, {})
        x_ND, meta = flat.dispatcher.dispatch(x, routing, plan)
        assert torch.equal(x_ND, want)
        assert meta.input_splits == sent
        assert meta.output_splits == (sent[rank],) * R
        assert meta.counts_local == tuple(R * len(m) for m in mine)
        order = [(t, k) for g in range(E) for t in range(T) for k in range(K)
                 if routing.topk_idx_TK[t, k] == g and plan.kept_TK[t, k]]
        assert meta.token_S.tolist() == [t for t, _ in order]
        assert torch.equal(meta.weight_S, torch.stack([routing.topk_weight_TK[t, k] for t, k in order]))
        if e > 1:  # rank-major arrival order -> expert-major; unregroup_N undoes it
            arrival = torch.cat([x[torch.tensor(mine[l], dtype=torch.long)] for _ in range(R) for l in range(e)])
            assert torch.equal(x_ND[meta.unregroup_N], arrival)
        else:
            assert meta.unregroup_N is None
        assert meta.nonfinite_ranks == ()
        assert flat.dispatcher.combine(x_ND, meta).shape == (T, D)
        assert [c.mode for c in world.of_kind("all_to_all_single")][:2] == ["mirror", "mirror"]

        for L in (1, 2) if ep == 4 else (2, 4):
            hier = _layer(ep, MODES["hierarchical"][0], {"ranks_per_node": L})
            assert hier.dispatcher.describe() == f"hierarchical(ranks_per_node={L})"
            h_ND, h_meta = hier.dispatcher.dispatch(x, routing, plan)
            # Two hops with per-node de-duplication deliver exactly the flat rows.
            assert torch.equal(h_ND, x_ND), L
            for name in ("input_splits", "output_splits", "counts_local"):
                assert getattr(h_meta, name) == getattr(meta, name), name
            route, M, m = h_meta.route, ep // L, rank // L
            uniq = tuple(len({t for g in range(n * L * e, (n + 1) * L * e) for t in _kept_tokens(plan, g)})
                         for n in range(M))
            assert route.uniq_send == uniq and route.uniq_recv == (uniq[m],) * M
            assert len(route.token_U) == sum(uniq) and len(route.index_Q) == sum(route.intra_send)
            assert sum(route.intra_recv) == h_ND.shape[0]
            assert hier.dispatcher.combine(h_ND, h_meta).shape == (T, D)


@pytest.mark.parametrize("ep,rank", EP_RANKS)
def test_padded_dispatch_layout(ep: int, rank: int) -> None:
    R, e, C = ep, E // ep, 1
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
    routing, plan = _routing(C)
    with fake_world(ep, rank) as world:
        layer = _layer(ep, MODES["static"][0], {})
        x_ND, meta = layer.dispatcher.dispatch(x, routing, plan)
        blocks = []
        for l in range(e):
            rows = x[torch.tensor(_kept_tokens(plan, rank * e + l), dtype=torch.long)]
            block = torch.cat([rows, rows.new_zeros(C - rows.shape[0], D)])  # padded to C
            blocks += [block] * R
        assert torch.equal(x_ND, torch.cat(blocks))
        assert meta.input_splits == meta.output_splits == (e * C,) * R
        assert meta.counts_local == (R * C,) * e
        assert layer.dispatcher.combine(x_ND, meta).shape == (T, D)
        calls = world.of_kind("all_to_all_single")
        assert [c.input_splits for c in calls] == [(e * C,) * R] * 2  # no count exchange
        assert all(c.mode == "mirror" for c in calls)


@pytest.mark.parametrize("ep,rank", EP_RANKS)
def test_overlap_chunks_add_up_to_the_unchunked_splits(ep: int, rank: int) -> None:
    routing, plan = _routing(None)
    with fake_world(ep, rank):
        flat = _layer(ep, {}, {})
        (whole,) = flat.dispatcher.route(routing, plan, 1)
        chunks = flat.dispatcher.route(routing, plan, 3)
        assert [c.start for c in chunks] == [0, 3, 7] and chunks[-1].stop == T
        sums = [tuple(map(sum, zip(*(split_sizes(c.kept, c.recv, ep)[i] for c in chunks)))) for i in range(3)]
        assert sums == list(split_sizes(whole.kept, whole.recv, ep))
        assert torch.equal(torch.cat([c.token_S + c.start for c in chunks]).sort().values,
                           whole.token_S.sort().values)


# -- whole layers: exchanges, host syncs ---------------------------------------------
def _tokens(n: int = 20) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)).requires_grad_()


def _run(layer: MoELayer, world: Any, x: torch.Tensor | None = None) -> dict:
    x = _tokens() if x is None else x
    n0, s0 = len(world.calls), HOST_SYNCS["count_exchange"]
    with audit_host_traffic() as fwd:
        out = layer(x)
    n1, s1 = len(world.calls), HOST_SYNCS["count_exchange"]
    with audit_host_traffic() as bwd:
        (out.output.float().square().sum() + out.aux_loss).backward()
    assert out.output.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(out.output).all() and torch.isfinite(x.grad).all()
    return {"fwd": fwd, "bwd": bwd, "marked_syncs": s1 - s0, "stats": out.stats,
            "forward_calls": world.calls[n0:n1], "backward_calls": world.calls[n1:]}


def _expected_describe(mode: str, ep: int) -> str:
    return {"flat": "all_to_all", "overlap": "all_to_all+overlap(3)",
            "hierarchical": "hierarchical(ranks_per_node=2)",
            "hierarchical_l1": "hierarchical(ranks_per_node=1)",
            "hierarchical_overlap": "hierarchical(ranks_per_node=2)+overlap(2)",
            "static": "padded"}[mode]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ep,rank", EP_RANKS)
def test_layer_multi_rank_path(mode: str, ep: int, rank: int) -> None:
    overrides, group_kwargs = MODES[mode]
    with fake_world(ep, rank) as world:
        layer = _layer(ep, overrides, group_kwargs, capacity_factor=1.25)
        assert layer.dispatcher.describe() == _expected_describe(mode, ep)
        res = _run(layer, world)
        groups = layer.groups
        reduced = res["stats"].reduce(groups.dp_group)
    fwd, bwd = res["fwd"], res["bwd"]
    static = mode == "static"
    # The documented syncs: one host read per forward, inside the marked count exchange;
    # none in backward; none at all with static shapes.
    assert fwd.unmarked_reads == [], fwd.unmarked_reads
    assert len(fwd.marked_reads) == res["marked_syncs"] == (0 if static else 1)
    assert bwd.reads == 0, bwd.unmarked_reads
    assert fwd.host_to_device == [] or all(s.startswith("moe/layer.py") for s in fwd.host_to_device), \
        fwd.host_to_device  # layer.py: see test_no_host_built_tensors_in_the_layer below
    assert bwd.host_to_device == []
    # Every tensor the data path creates names its device (else: the CPU, on a GPU run).
    assert fwd.implicit_device == [] and bwd.implicit_device == [], fwd.implicit_device
    # Exchanges. Forward: a count exchange (an all-to-all of [R, n*e+1] blocks, or the
    # hierarchical all-gather), then the rows; every dispatch-direction row exchange is
    # consistent with what the count exchange delivered ("mirror").
    a2a = [c for c in res["forward_calls"] if c.kind == "all_to_all_single"]
    gathers = [c for c in res["forward_calls"] if c.kind == "all_gather"]
    chunks = overrides.get("overlap_chunks", 1)
    if static:
        assert not gathers and len(a2a) == 2 and all(c.mode == "mirror" for c in a2a)
    elif mode.startswith("hierarchical"):
        L = group_kwargs["ranks_per_node"]
        assert len(gathers) == 1 and gathers[0].group_size == ep
        # Per chunk: side message + unique rows (inter-node), fan-out (intra-node); then
        # the combine's intra-node and inter-node hops back.
        assert len(a2a) == 5 * chunks
        if L != ep // L:
            assert sum(c.group_size == ep // L for c in a2a) == 3 * chunks
            assert sum(c.group_size == L for c in a2a) == 2 * chunks
        assert sum(c.mode == "mirror" for c in a2a) >= 3 * chunks
    else:
        count, rows = a2a[0], a2a[1:]
        e = E // ep
        assert count.shape == (ep, chunks * e + 1) and count.input_splits == (1,) * ep
        assert count.mode == "mirror"
        assert len(rows) == 2 * chunks
        dispatch = [c for c in rows if c.output_splits == (c.input_splits[rank],) * ep]
        assert len(dispatch) >= chunks and all(c.mode == "mirror" for c in dispatch)
    # Backward: the reverse of every forward row exchange (splits swapped), no count
    # exchange, no gather.
    fwd_rows = [c for c in a2a if not (c is a2a[0] and not static and not gathers)]
    back = [c for c in res["backward_calls"] if c.kind == "all_to_all_single"]
    assert not [c for c in res["backward_calls"] if c.kind != "all_to_all_single"]
    assert sorted((c.output_splits, c.input_splits, c.group_size) for c in fwd_rows) == \
        sorted((c.input_splits, c.output_splits, c.group_size) for c in back)
    # Stats reduce over the DP group: as if W ranks held this rank's numbers.
    assert int(reduced.num_ranks) == ep and int(reduced.num_tokens) == ep * 20


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_router_syncs_once_in_the_marked_region(router: str, mode: str) -> None:
    overrides, group_kwargs = MODES[mode]
    with fake_world(8, 5) as world:
        layer = _layer(8, overrides, group_kwargs, router=router, capacity_factor=1.25,
                       **ROUTERS[router])
        res = _run(layer, world)
    assert res["fwd"].unmarked_reads == [], res["fwd"].unmarked_reads
    assert len(res["fwd"].marked_reads) == (0 if mode == "static" else 1)
    assert res["bwd"].reads == 0


def test_stats_summary_names_its_device() -> None:
    # MoEStats.to_dict once built a CPU arange next to device counts (a crash on CUDA).
    with fake_world(4, 2) as world:
        res = _run(_layer(4, {}, {}), world)
    with audit_host_traffic() as traffic:
        summary = res["stats"].to_dict()
    assert summary["num_tokens"] == 20 and summary["experts_per_token_mean"] == K
    assert traffic.implicit_device == []


@pytest.mark.parametrize("mode", list(MODES))
def test_no_host_built_tensors_in_the_data_path(mode: str) -> None:
    # On CUDA torch.tensor(host data, device=cuda) is a pageable copy that synchronises;
    # the data path stages host ints through permute.host_ints (pinned, non-blocking).
    overrides, group_kwargs = MODES[mode]
    with fake_world(8, 3) as world:
        res = _run(_layer(8, overrides, group_kwargs, capacity_factor=1.25), world)
    outside_layer = [s for s in res["fwd"].host_to_device + res["bwd"].host_to_device
                     if not s.startswith("moe/layer.py")]
    assert outside_layer == []


def test_no_host_built_tensors_in_the_layer() -> None:
    # MoELayer._stats once built num_tokens / num_ranks with torch.as_tensor(int, device=...).
    with fake_world(4, 1) as world:
        res = _run(_layer(4, {}, {}), world)
    assert res["fwd"].host_to_device == []
