"""MoEProfiler in one process: window, backward attribution, record contents, outputs,
and that outside its window it leaves the layer exactly as it was (no hooks, no marks,
no extra host reads)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.profiling.profiler import MoEProfiler, ProfilerConfig
from expert_parallel.profiling.records import build_record, markdown_table, per_rank_vector
from tests.harness import count_host_reads
from expert_parallel.profiling.timer import NULL_TIMER, PHASES, PhaseTimer



def _layer(**overrides) -> MoELayer:
    cfg = dict(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2,
               capacity_factor=1.0, activation="gelu")
    cfg.update(overrides)
    return MoELayer(MoEConfig(**cfg), seed=3)


def _step(layer: MoELayer, seed: int, tokens: int = 64) -> object:
    x = torch.randn(tokens, layer.config.hidden_size, generator=torch.Generator().manual_seed(seed),
                    requires_grad=True)
    out = layer(x)
    (out.output.square().sum() + out.aux_loss).backward()
    return out


def test_window_attaches_and_detaches() -> None:
    layer = _layer()
    prof = MoEProfiler({"moe": layer}, ParallelGroups.single(), ProfilerConfig(start_step=2, num_steps=2))
    seen = []
    for step in range(6):
        prof.step_begin(step)
        seen.append((layer.timer is not NULL_TIMER, len(layer._forward_hooks)))
        _step(layer, step)
        rec = prof.step_end(step, step_time_s=0.01)
        assert (rec is not None) == (2 <= step < 4)
    assert seen == [(False, 0), (False, 0), (True, 1), (True, 1), (False, 0), (False, 0)]
    assert [r["step"] for r in prof.records] == [2, 3]
    assert layer.timer is NULL_TIMER and layer.dispatcher.timer is NULL_TIMER


def test_backward_is_attributed_to_every_phase() -> None:
    layer = _layer()
    prof = MoEProfiler({"moe": layer}, ParallelGroups.single(), ProfilerConfig(0, 1))
    prof.step_begin(0)
    _step(layer, 0)
    rec = prof.step_end(0, step_time_s=1.0)["layers"]["moe"]
    phases = rec["phases"]
    for p in ("router", "permute", "experts", "unpermute"):
        assert phases[p]["forward_s"] > 0 and phases[p]["backward_s"] > 0, p
    assert phases["count_exchange"]["backward_s"] == 0.0
    assert phases["unattributed"]["backward_s"] == 0.0  # every mark met its predecessor
    bwd_sum = sum(v["backward_s"] for v in phases.values())
    assert rec["backward_s"] == pytest.approx(bwd_sum, rel=1e-9)
    fwd_sum = sum(v["forward_s"] for v in phases.values())
    assert rec["forward_phase_sum_s"] == pytest.approx(fwd_sum, rel=1e-9)
    assert 0 < fwd_sum <= rec["forward_s"]


def test_timer_without_input_grad_merges_into_unattributed() -> None:
    """No grad on the layer input: the marks on tensors that need no gradient (the
    input, the rows into the experts) are skipped; the segments that do complete are
    attributed, and nothing is double counted."""
    layer = _layer()
    timer = PhaseTimer()
    layer.set_timer(timer)  # a bare timer: the layer itself drops every backward mark
    out = layer(torch.randn(32, 16))
    out.output.sum().backward()
    bwd = timer.collect_passes()["backward"]
    assert not {"router", "permute", "experts", "dispatch_a2a"} & set(bwd)
    assert bwd["unpermute"] > 0 and bwd["combine_a2a"] > 0
    assert bwd["total"] == pytest.approx(sum(v for k, v in bwd.items() if k != "total"), rel=1e-9)


def test_bare_timer_attributes_the_backward_of_every_phase() -> None:
    """A timer attached with set_timer (as the launcher does), no profiler hooks: with an
    input that needs a gradient, every phase's backward is attributed."""
    layer = _layer()
    timer = PhaseTimer()
    layer.set_timer(timer)
    _step(layer, 0)
    phases = timer.collect()
    for p in ("router", "permute", "dispatch_a2a", "experts", "combine_a2a", "unpermute"):
        assert phases[p + ".bwd"] > 0, p
    assert "unattributed.bwd" not in phases


@pytest.mark.parametrize("overlap", [False, True])
def test_shared_expert_backward_is_its_own_segment(overlap: bool) -> None:
    """The shared expert is a branch beside the routed path: run after the combine, its
    backward comes first; overlapped with the dispatch exchange, between the experts and
    the dispatch exchange. Either way every segment is attributed, its own included."""
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2,
                               num_shared_experts=1, shared_expert_overlap=overlap), seed=1)
    timer = PhaseTimer()
    layer.set_timer(timer)
    x = torch.randn(24, 16, requires_grad=True)
    layer(x).output.square().sum().backward()
    order = [m for m, _ in timer._marks]
    routed = ["unpermute", "combine_a2a", "experts", "dispatch_a2a", "permute", "router"]
    at = 3 if overlap else 0
    assert order == ["begin"] + routed[:at] + ["shared_expert"] + routed[at:], order
    phases = timer.collect()
    assert phases["shared_expert.bwd"] > 0 and "unattributed.bwd" not in phases, phases


def test_record_counts_match_layer_stats() -> None:
    layer = _layer(capacity_factor=0.75)
    prof = MoEProfiler({"moe": layer}, ParallelGroups.single(), ProfilerConfig(0, 1))
    prof.step_begin(0)
    out = _step(layer, 5, tokens=40)
    rec = prof.step_end(0)["layers"]["moe"]
    tok = rec["tokens"]
    assert tok["routed_E"] == out.stats.routed_E.tolist()
    assert tok["kept_E"] == out.stats.kept_E.tolist()
    assert tok["dropped_E"] == (out.stats.routed_E - out.stats.kept_E).tolist()
    cap = layer.config.capacity(40, True)
    assert tok["capacity_E"] == [cap] * 4
    assert tok["capacity_slack_rows"] == 4 * cap - sum(tok["kept_E"])
    assert tok["drop_fraction"] == pytest.approx(out.stats.drop_fraction)
    assert tok["padding_computed"] is False
    routed = tok["routed_E"]
    assert rec["imbalance"]["experts_routed_max_over_mean"] == pytest.approx(max(routed) / (sum(routed) / 4))
    assert rec["per_rank"]["routed_RE"] == [routed]
    assert rec["imbalance"]["received_rows_per_rank"] == [sum(tok["kept_E"])]
    assert rec["forward_calls"] == 1


def test_disabled_profiler_adds_no_host_read_and_no_node() -> None:
    plain, profiled = _layer(), _layer()
    prof = MoEProfiler({"moe": profiled}, ParallelGroups.single(), ProfilerConfig(start_step=100))
    x = torch.randn(32, 16, requires_grad=True)
    counts = []
    for layer, p in ((plain, None), (profiled, prof)):
        with count_host_reads() as reads:
            if p:
                p.step_begin(0)
            out = layer(x)
            out.output.sum().backward()
            if p:
                assert p.step_end(0, 0.1) is None
        counts.append(reads["n"])
        assert "BackwardMark" not in type(out.output.grad_fn).__name__
    assert counts[0] == counts[1]


def test_outputs_jsonl_markdown_tensorboard(tmp_path) -> None:
    layers = {"l0": _layer(), "l1": _layer(capacity_factor=None)}
    prof = MoEProfiler(layers, ParallelGroups.single(),
                       ProfilerConfig(1, 2, out_dir=str(tmp_path), tensorboard=True))
    for step in range(4):
        prof.step_begin(step)
        t0 = time.perf_counter()
        x = torch.randn(32, 16, requires_grad=True)
        h = layers["l0"](x).output
        (layers["l1"](h).output.sum()).backward()
        prof.step_end(step, step_time_s=time.perf_counter() - t0)
    prof.close()
    lines = (tmp_path / "moe_profile.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    rec = json.loads(lines[0])
    assert set(rec["layers"]) == {"l0", "l1"}
    assert 0 < rec["a2a_share"] < 1 and 0 < rec["moe_share"] <= 1.0 + 1e-9
    assert rec["layers"]["l1"]["tokens"]["drop_fraction"] == 0.0
    md = (tmp_path / "moe_profile.md").read_text()
    assert "## l0" in md and "## l1" in md and "| experts |" in md
    assert list((tmp_path / "tb_moe").glob("events.out.tfevents.*"))


def test_build_record_ep_imbalance_hand_derived() -> None:
    """World 4 = 2 EP groups of 2, 4 experts (2 per rank). Counts chosen by hand."""
    layer = _layer()  # only used for its config (E=4) and groups (ep_size is read from meta)
    timer = PhaseTimer()
    kept = [[4, 0, 0, 0], [4, 0, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]]
    table, meta = [], None
    for r in range(4):
        stats = _layer()(torch.randn(8, 16)).stats
        stats = type(stats)(**{**stats.__dict__, "routed_E": torch.tensor(kept[r]),
                               "kept_E": torch.tensor(kept[r]), "capacity_E": torch.tensor([4] * 4)})
        passes = {"forward": {p: 0.001 * (r + 1) for p in PHASES} | {"total": 0.01},
                  "backward": {"experts": 0.002, "total": 0.002}}
        vec, meta = per_rank_vector(layer, passes, timer, stats)
        table.append(vec.tolist() + [0.1])
    meta = {**meta, "ep_size": 2}
    groups = type("G", (), {"ep_size": 2})()
    rec = build_record(7, table, {"moe": meta}, {"moe": layer}, groups)["layers"]["moe"]
    # EP group {0,1}: rank 0 owns experts 0,1 -> 4+0+4+0 = 8; rank 1 owns 2,3 -> 0+0+2+2 = 4.
    # EP group {2,3}: (1+1)+(1+1) = 4 each.  Worst group max/mean = 8 / 6.
    assert rec["imbalance"]["received_rows_per_rank"] == [8, 4, 4, 4]
    assert rec["imbalance"]["ep_ranks_received_max_over_mean"] == pytest.approx(8 / 6)
    assert rec["tokens"]["kept_E"] == [10, 2, 4, 4]
    assert rec["tokens"]["capacity_slack_rows"] == 64 - 20
    assert rec["phases"]["router"]["slowest_rank"] == 3
    assert rec["phases"]["router"]["max_over_mean"] == pytest.approx(0.004 / 0.0025)
    assert "| router |" in markdown_table([build_record(7, table, {"moe": meta}, {"moe": layer}, groups)])


@pytest.mark.parametrize("kwargs,field", [({"start_step": -1}, "start_step"),
                                          ({"num_steps": 1.5}, "num_steps"),
                                          ({"tensorboard": True}, "out_dir")])
def test_config_validation_names_field(kwargs, field) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        ProfilerConfig(**kwargs)


def test_profiler_rejects_empty_layers() -> None:
    with pytest.raises(ValueError, match="layers"):
        MoEProfiler({}, ParallelGroups.single())


def test_profiler_on_the_launcher_model(tmp_path) -> None:
    """The launcher's MoE transformer: one record per step with every MoE layer, and
    the model's output unchanged by profiling (marks are identities)."""
    from expert_parallel.models.transformer import ModelConfig, MoETransformer

    cfg = ModelConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=2, n_heads=2,
                      moe=MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2,
                                    capacity_factor=1.25))
    model = MoETransformer(cfg, ParallelGroups.single(), seed=0)
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(tokens).logits.detach()
    prof = MoEProfiler(model.moe_layers(), ParallelGroups.single(), ProfilerConfig(0, 1, out_dir=str(tmp_path)))
    prof.step_begin(0)
    t0 = time.perf_counter()
    out = model(tokens)
    (out.logits.square().mean() + out.aux_loss).backward()
    rec = prof.step_end(0, step_time_s=time.perf_counter() - t0)
    prof.close()
    assert torch.equal(out.logits.detach(), reference)
    assert set(rec["layers"]) == set(model.moe_layers())
    for layer in rec["layers"].values():
        assert layer["phases"]["unattributed"]["backward_s"] == 0.0
        assert layer["tokens"]["num_tokens"] == 32
    assert 0 < rec["moe_share"] < 1
    assert (tmp_path / "moe_profile.md").exists()


def test_previous_timer_is_restored_after_the_window() -> None:
    layer = _layer()
    own = PhaseTimer()
    layer.set_timer(own)
    prof = MoEProfiler({"moe": layer}, ParallelGroups.single(), ProfilerConfig(0, 1))
    prof.step_begin(0)
    assert layer.timer is not own
    _step(layer, 0)
    prof.step_end(0)
    assert layer.timer is own and layer.dispatcher.timer is own
