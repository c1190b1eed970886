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
           "--warmup", "0", "--overlap-chunks", "2", "--probe-bytes", "4096", "--probe-reps", "1",
           "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, env=clean_env(), check=True, timeout=240, capture_output=True)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"flat", "overlap2", "hierarchical", "static_shapes"}
    assert report["results"]["flat"]["ratio_vs_flat"] == 1.0
    assert report["config"]["world_size"] == 4 and report["config"]["ranks_per_node"] == 2
    for key in ("command", "versions", "hardware"):
        assert key in report
    for name, r in report["results"].items():
        assert len(r["times_s"]) == 1 and 0 < r["median_exchange_s"] < r["median_s"], name
        assert sum(r["kept_E"]) > 0, name
    # The link probe and the cluster model's prediction for the flat and hierarchical modes.
    model = report["model_vs_measured"]
    assert model["probe"]["intra"]["GBps"] > 0 and model["probe"]["inter"]["GBps"] > 0
    assert abs(sum(model["gpu_share"]) - 1.0) < 1e-9
    for alg in ("flat", "hierarchical"):
        m = model["modes"][alg]
        assert m["exchange_s"] > 0 and m["measured_exchange_s"] == report["results"][alg]["median_exchange_s"]
    # De-duplication: the hierarchical exchange puts fewer bytes on the inter-node link.
    assert model["modes"]["hierarchical"]["inter_bytes_per_rank"] < model["modes"]["flat"]["inter_bytes_per_rank"]
    md = (tmp_path / "dm.md").read_text()
    assert "Cluster model vs measurement" in md and (tmp_path / "dm.png").exists()
    assert "- hierarchical faster than flat:" in md and "- overlap layer time <= 0.85x flat:" in md
