"""``benchmarks/compare_hf_ep.py`` at a tiny size: both sides run in the same processes on
the same weights and batch, their logits equal plain transformers' before any timing,
and the report holds every documented section.

No timing assertions: only that the outputs exist and say what they should (equal
logits, positive step times and their ratio, parameter bytes where FSDP's dense sharding
shows, peaks measured with the collectives replayed and repeating exactly, a breakdown
per side with the exchanges split by collective, and our layers' phases).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.launcher import REPO, clean_env

TINY = ("--families", "qwen3_moe", "deepseek_v3", "--ep", "2", "--hidden", "32", "--ffn", "64", "--vocab", "96",
        "--seq", "16", "--batch", "2", "--iters", "1", "--warmup", "1", "--memory-repeats", "2")


def test_compare_hf_ep_tiny(tmp_path: Path) -> None:
    out = tmp_path / "hf_ep.json"
    proc = subprocess.run([sys.executable, "benchmarks/compare_hf_ep.py", "--out", str(out), *TINY], cwd=REPO,
                          env=clean_env(), timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists()
    for key in ("command", "config", "versions", "hardware", "rows", "all_met", "min_speedup"):
        assert key in report, key
    assert [(r["family"], r["ep"]) for r in report["rows"]] == [("qwen3_moe", 2), ("deepseek_v3", 2)]
    for r in report["rows"]:
        tag = r["family"]
        assert r["logits_equal"], (tag, r["equality"])
        assert r["equality"]["ours_vs_theirs"] <= 1e-5, tag
        assert r["step_ms"]["ours"] > 0 and r["step_ms"]["theirs"] > 0, tag
        assert abs(r["speedup"] - r["step_ms"]["theirs"] / r["step_ms"]["ours"]) < 1e-9, tag
        assert r["their_experts_implementation"] == "grouped_mm", tag
        ours, theirs = r["memory"]["ours"], r["memory"]["theirs"]
        # FSDP2 holds half of the dense parameters per rank at W=2; we replicate them.
        assert abs(theirs["param_mib"]["dense"] - ours["param_mib"]["dense"] / 2) <= 0.01 * ours["param_mib"]["dense"]
        assert abs(theirs["param_mib"]["experts"] - ours["param_mib"]["experts"]) <= 1e-6, tag
        for side in (ours, theirs):
            assert side["method"] == "replayed" and side["spread"] == 0.0, (tag, side)
        assert r["memory"]["zero2_estimate"]["total_mib"] < ours["total_mib"]
        assert {"fsdp_all_gather", "fsdp_reduce_scatter", "all_to_all"} <= set(r["breakdown_ms"]["theirs"]), tag
        assert {"all_reduce", "all_to_all", "gemm"} <= set(r["breakdown_ms"]["ours"]), tag
        assert r["our_phases_ms"]["moe_total"] > 0 and "fwd dispatch_a2a" in r["our_phases_ms"], tag
        assert r["step_ms"]["plain"] > 0 and r["floor_speedup"] > 0, tag
    assert r["our_phases_ms"].get("fwd shared_expert", 0) > 0  # DeepSeek's shared experts are timed
    assert "| qwen3_moe | 2 |" in md and "## Memory per rank" in md and "## Where the time goes" in md
