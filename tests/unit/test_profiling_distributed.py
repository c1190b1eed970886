"""MoEProfiler on 2 real gloo ranks (EP=2): a disabled profiler adds no collective and
no host sync; an enabled one adds none in the step either (its one all-gather happens in
``step_end``); the record agrees on both ranks and matches what each rank measured."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.distributed.collectives import CALL_COUNTS
from expert_parallel.profiling.profiler import MoEProfiler, ProfilerConfig
from tests.harness import run_ranks
from tests.harness import count_host_reads

D = 8


def _fwd_bwd(layer: MoELayer, rank: int, step: int):
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(100 * rank + step), requires_grad=True)
    out = layer(x)
    (out.output.square().sum() + out.aux_loss).backward()
    return out


def _counted(fn) -> tuple[dict, int]:
    before = dict(CALL_COUNTS)
    with count_host_reads() as reads:
        fn()
    after = dict(CALL_COUNTS)
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}, reads["n"]


def _worker(rank: int, world: int) -> dict:
    groups = ParallelGroups.build(2)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=16, num_experts=4, top_k=2, capacity_factor=1.0,
                    activation="gelu")
    layer = MoELayer(cfg, groups, seed=1)
    prof = MoEProfiler({"moe": layer}, groups, ProfilerConfig(start_step=1, num_steps=1))
    out: dict = {}
    # Step 0 without a profiler at all; step 0 again with the profiler outside its window.
    out["none"] = _counted(lambda: _fwd_bwd(layer, rank, 0))

    def disabled() -> None:
        prof.step_begin(0)
        _fwd_bwd(layer, rank, 0)
        assert prof.step_end(0, 0.1) is None
    out["disabled"] = _counted(disabled)
    # Step 1 in the window: the hot path alone, then step_end alone.
    prof.step_begin(1)
    holder = {}
    out["enabled_step"] = _counted(lambda: holder.setdefault("out", _fwd_bwd(layer, rank, 1)))
    rec_box = {}
    out["enabled_end"] = _counted(lambda: rec_box.setdefault("rec", prof.step_end(1, 0.5)))
    out["record"] = rec_box["rec"]
    stats = holder["out"].stats
    out["routed"] = stats.routed_E.tolist()
    out["kept"] = stats.kept_E.tolist()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_worker, 2, timeout=120)


def test_disabled_profiler_costs_nothing(results) -> None:
    for r in results:
        assert r["disabled"] == r["none"], (r["disabled"], r["none"])
        assert r["none"][0].get("all_to_all_single", 0) == 4  # dispatch+combine, fwd+bwd


def test_enabled_profiler_adds_nothing_to_the_step(results) -> None:
    for r in results:
        assert r["enabled_step"] == r["none"]
        calls, _ = r["enabled_end"]
        assert calls == {"all_gather": 1}


def test_record_is_global_and_consistent(results) -> None:
    recs = [r["record"] for r in results]
    assert recs[0]["layers"]["moe"]["tokens"] == recs[1]["layers"]["moe"]["tokens"]
    layer = recs[0]["layers"]["moe"]
    assert layer["per_rank"]["routed_RE"] == [results[0]["routed"], results[1]["routed"]]
    assert layer["tokens"]["kept_E"] == [a + b for a, b in zip(results[0]["kept"], results[1]["kept"])]
    # Rank r receives, for its 2 experts, what both ranks kept for them.
    kept = [results[0]["kept"], results[1]["kept"]]
    expect = [sum(kept[s][e] for s in range(2) for e in range(2 * r, 2 * r + 2)) for r in range(2)]
    assert layer["imbalance"]["received_rows_per_rank"] == expect
    d = layer["a2a"]["dispatch"]
    # Dispatch sends this rank's kept rows (fp32, D wide); combine sends them back.
    assert d["bytes_sent"] == [sum(k) * D * 4 for k in kept]
    assert d["bytes_received"] == [n * D * 4 for n in expect]
    c = layer["a2a"]["combine"]
    assert c["bytes_sent"] == d["bytes_received"] and c["bytes_received"] == d["bytes_sent"]
    assert d["forward_GBps"] > 0 and d["backward_GBps"] > 0
    for p in ("dispatch_a2a", "combine_a2a", "experts"):
        assert layer["phases"][p]["backward_s"] > 0
        assert layer["phases"][p]["slowest_rank"] in (0, 1)
    assert layer["phases"]["unattributed"]["backward_s"] == 0.0
