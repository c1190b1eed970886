"""Issue 19's benchmarks at a tiny size: moe_vs_dense, decode_latency, expert_backends.

No timing assertions: each script runs, writes JSON + markdown + PNG with the documented
keys, and the numbers are internally consistent (breakdowns non-negative, the models'
parameter counts as designed, every mode measured, a crossover reported)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_benchmarks import _run


def test_moe_vs_dense_tiny(tmp_path: Path) -> None:
    report = _run("moe_vs_dense.py", tmp_path / "mvd.json", "--tiny", "--wide", timeout=600)
    results = {r["model"]: r for r in report["results"]}
    assert set(results) == {"dense", "moe", "moe_wide"}
    dense, moe, wide = results["dense"], results["moe"], results["moe_wide"]
    # Equal active FFN parameters per token; the MoEs hold E/k and E times the dense FFN.
    assert dense["ffn_params_per_layer"]["active"] == moe["ffn_params_per_layer"]["active"] \
        == wide["ffn_params_per_layer"]["active"]
    assert moe["ffn_params_per_layer"]["total"] == 2 * dense["ffn_params_per_layer"]["total"]  # E=4, k=2
    assert wide["ffn_params_per_layer"]["total"] == 4 * dense["ffn_params_per_layer"]["total"]
    assert dense["dispatcher"] == "none" and moe["dispatcher"] != "none"
    for r in results.values():
        assert r["steps"] == 4 and r["tokens_per_s"] > 0
        assert all(v >= 0 for v in r["breakdown_ms"].values())
        assert [v["step"] for v in r["val"]] == [0, 2, 4]
        assert r["val_loss_at_equal_time"] > 0
    assert dense["breakdown_ms"]["dispatch_combine"] == 0.0 and moe["breakdown_ms"]["dispatch_combine"] > 0
    assert len(moe["routed_E"]) == 4 and sum(moe["routed_E"]) > 0
    gpus = {(c["phase"], c["gpus"]) for c in report["cluster_prediction"]}
    assert gpus == {("train", 8), ("train", 64), ("decode", 8), ("decode", 64)}
    assert report["sentence"].startswith("With the dense model's active parameters")


def test_decode_latency_tiny(tmp_path: Path) -> None:
    report = _run("decode_latency.py", tmp_path / "dl.json", "--tiny", timeout=600)
    rows = report["rows"]
    modes = {r["mode"] for r in rows if r["model"] == "moe"}
    assert modes == {"flat", "overlap", "static", "allgather", "auto"}  # hierarchical needs EP >= 4
    assert {r["batch"] for r in rows} == {1, 4}
    for r in rows:
        assert r["token_ms"] > 0 and r["layer_ms"] > 0 and r["samples"] == 3
        if r["model"] == "moe":
            assert r["phases_ms"]["experts"] > 0 and r["phases_ms"]["router"] > 0
    flat = [r for r in rows if r["mode"] == "flat"]
    assert all(r["phases_ms"]["count_exchange"] > 0 for r in flat)
    assert all(r["phases_ms"]["count_exchange"] == 0 for r in rows if r["mode"] == "static")
    assert report["crossover"] in (0, 1, 4)
    assert set(report["target_check"]) == {"ep2_batch1", "ep2_batch4"}
    assert "allgather" in report["dispatchers"]["2"]["('moe', 'allgather', 1)"]


def test_expert_backends_tiny(tmp_path: Path) -> None:
    report = _run("expert_backends.py", tmp_path / "eb.json", "--tiny", timeout=600)
    points = {(r["experts"], r["dtype"], r["backend"]) for r in report["rows"]}
    assert points == {(e, d, b) for e in (4, 8) for d in ("fp32", "bf16") for b in ("loop", "bmm", "grouped_mm")}
    assert all(r["cpu_ms"] > 0 for r in report["rows"])
    assert report["recommended_auto"] in ("loop", "bmm", "grouped_mm")
    assert report["auto_backend_table"]["cpu"] in ("loop", "bmm", "grouped_mm")
