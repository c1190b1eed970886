"""benchmarks/load_balancer.py at a tiny size: it runs, writes JSON + md + png, and the
placement it measures really evens out the ranks (the counts are exact, not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_load_balancer_benchmark_tiny(tmp_path) -> None:
    out = tmp_path / "lb.json"
    proc = subprocess.run([sys.executable, "benchmarks/load_balancer.py", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (tmp_path / "lb.md").exists() and (tmp_path / "lb.png").exists()
    assert set(report["cases"]) == {"zipf0.8_dropless", "zipf0.8_cf1.25", "zipf1.2_dropless", "zipf1.2_cf1.25"}
    for name, case in report["cases"].items():
        before, after = case["identity"], case["placed"]
        # Rows per rank are exact counts; the same tokens, moved.
        assert sum(before["rank_rows"]) == sum(after["rank_rows"]), name
        assert after["max_over_mean"] < before["max_over_mean"], name
        assert len(case["table"]) == 16 + 4
    assert report["memory_per_redundant_slot_bytes"]["weights_plus_adamw"] == \
        3 * report["memory_per_redundant_slot_bytes"]["weights"]
    md = (tmp_path / "lb.md").read_text()
    assert "## Targets" in md and "max/mean rank load <= 1.10" in md
