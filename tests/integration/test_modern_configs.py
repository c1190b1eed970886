"""launch/configs/deepseek_tiny.json and qwen_tiny.json train under torchrun at EP=2 and
EP=4: the validation loss falls and the drop accounting is reported per layer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.launcher import REPO, TRAIN, clean_env, free_port

SMALL = ["--seq-len", "32", "--global-batch-size", "8", "--eval-batches", "2", "--eval-every", "40",
         "--max-steps", "40", "--warmup-steps", "5", "--tensorboard", "false", "--dtype", "fp32",
         "--collective-timeout-s", "120", "--d-model", "64", "--n-layers", "2"]


@pytest.mark.parametrize("design,ep", [("deepseek_tiny", 2), ("deepseek_tiny", 4), ("qwen_tiny", 2),
                                       ("qwen_tiny", 4)])
def test_design_config_trains(tmp_path, design: str, ep: int) -> None:
    out = tmp_path / design
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ep}", f"--master_port={free_port()}",
           TRAIN, "--config", str(REPO / "launch" / "configs" / f"{design}.json"), *SMALL,
           "--ep-size", str(ep), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ep_size"] == ep
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5, summary
    config = json.loads((REPO / "launch" / "configs" / f"{design}.json").read_text())
    drops = summary["drop_fraction_per_layer"]
    assert len(drops) == 2 and all(0.0 <= d < 1.0 for d in drops.values())
    if config["capacity_factor"] is None:
        assert all(d == 0.0 for d in drops.values())  # dropless design: nothing dropped
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    layer = next(iter(records[-1]["layers"].values()))
    assert len(layer["kept"]) == config["num_experts"] and sum(layer["routed"]) > 0
