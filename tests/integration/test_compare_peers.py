"""The peers benchmark at a tiny size: every installed peer runs, computes our function
(checked before timing), and a missing peer is reported, not skipped.

No timing assertions: only that the script writes its documented outputs, that each
installed peer passed its function-equality check in fp32 and bf16 (fp32: bitwise or
within 1e-5; bf16: within 3% where its router routes alike), and that peak memory,
measured with the collectives replayed, repeats exactly.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.integration.launcher import REPO, clean_env

TINY = ("--tokens", "96", "--hidden", "32", "--ffn", "64", "--iters", "1", "--warmup", "1",
        "--memory-repeats", "2", "--profile-repeats", "1")


def _run(out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "benchmarks/compare_peers.py", "--out", str(out), *TINY, *args],
                          cwd=REPO, env={**clean_env(), "DS_ACCELERATOR": "cpu"}, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def _installed(peer: str) -> bool:
    return importlib.util.find_spec(peer) is not None


def test_every_installed_peer_computes_our_function(tmp_path) -> None:
    report, md = _run(tmp_path / "p.json")
    for key in ("command", "config", "versions", "hardware", "by_dtype", "targets"):
        assert key in report, key
    assert set(report["by_dtype"]) == {"fp32", "bf16"}
    ran = [p for p in ("deepspeed", "torchtitan", "transformers") if p not in report["missing_peers"]]
    # Installed means it ran; not installed means it is named as missing, in the report.
    for peer in ("deepspeed", "torchtitan", "transformers"):
        if _installed(peer):
            assert peer in ran, report["missing_peers"].get(peer)
        else:
            assert peer in report["missing_peers"] and f"**{peer}: missing**" in md
    for dtype, row in report["by_dtype"].items():
        for peer in ran:
            eq = row["equality"][peer]
            assert eq["pass"], (dtype, peer, eq)
            if dtype == "fp32":
                assert eq["tokens_routed_otherwise"] == 0 and eq["max_rel_err_output"] <= 1e-5, eq
            else:
                assert eq["max_rel_err_output_unaffected"] <= 3e-2, eq
            assert row["times_ms"][peer] > 0 and row[f"speedup_vs_{peer}"] > 0
        # Replayed collectives: the peak is identical on every repeat, for every row.
        for name, spread in row["memory_spread"].items():
            assert spread == 0.0, (dtype, name, spread)
            assert row["peak_mib"][name] > 0 and row["exchange_mib"][name] > 0
        for lname in ("ours", "ours_dropless"):
            assert row[f"{lname}_over_floor"] > 0
            assert row["breakdown_ms"][lname]["gemm"] > 0
    # bf16 rows move half the bytes of fp32 ones through our exchanges.
    fp32, bf16 = report["by_dtype"]["fp32"], report["by_dtype"]["bf16"]
    assert abs(2 * bf16["exchange_mib"]["ours_dropless"] - fp32["exchange_mib"]["ours_dropless"]) < \
        0.05 * fp32["exchange_mib"]["ours_dropless"]
    if "torchtitan" in ran:
        assert any(t["target"] == "speedup vs torchtitan" for t in report["targets"])


def test_missing_peer_is_reported(tmp_path) -> None:
    # GELU experts: torchtitan and transformers cannot express them, so both must be
    # reported missing with a reason, while DeepSpeed (if installed) still runs.
    report, md = _run(tmp_path / "g.json", "--activation", "gelu", "--dtype", "fp32")
    for peer in ("torchtitan", "transformers"):
        assert peer in report["missing_peers"], report["missing_peers"]
        assert f"**{peer}: missing**" in md
    assert set(report["by_dtype"]) == {"fp32"}
    if _installed("deepspeed"):
        assert report["by_dtype"]["fp32"]["equality"]["deepspeed"]["pass"]
