"""benchmarks/dispatch_modes.py runs at a tiny size under torchrun and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.launcher import REPO, clean_env, free_port


def test_dispatch_modes_benchmark_tiny(tmp_path) -> None:
    out = tmp_path / "dm.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
           f"--master_port={free_port()}", "benchmarks/dispatch_modes.py", "--ranks-per-node", "2",
           "--tokens", "64", "--hidden", "16", "--ffn", "32", "--experts", "8", "--iters", "1",
           "--warmup", "0", "--overlap-chunks", "2", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, env=clean_env(), check=True, timeout=240, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"flat", "overlap2", "hierarchical", "static_shapes"}
    assert report["results"]["flat"]["ratio_vs_flat"] == 1.0
    assert report["config"]["world_size"] == 4 and report["config"]["ranks_per_node"] == 2
    for key in ("command", "versions", "hardware"):
        assert key in report
    assert (tmp_path / "dm.md").exists()
