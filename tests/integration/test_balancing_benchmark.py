"""benchmarks/balancing.py runs at a tiny size and writes its documented outputs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.launcher import REPO, clean_env


def test_balancing_benchmark_tiny(tmp_path) -> None:
    out = tmp_path / "balancing.json"
    subprocess.run([sys.executable, "benchmarks/balancing.py", "--steps", "4", "--out", str(out)],
                   cwd=REPO, env=clean_env(), check=True, timeout=180, capture_output=True)
    report = json.loads(out.read_text())
    for key in ("command", "config", "versions", "hardware", "results", "target_met"):
        assert key in report
    assert set(report["results"]) == {"aux_loss", "aux_free_bias", "no_balancing"}
    for r in report["results"].values():
        assert 0.0 <= r["drop_fraction"] <= 1.0 and r["max_over_mean_load"] >= 1.0
    assert (tmp_path / "balancing.md").exists() and (tmp_path / "balancing.png").exists()
