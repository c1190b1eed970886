"""``launch/finetune_hf.py`` under torchrun (2 ranks, EP=2), read from its files.

Two families, 20 steps each: Qwen3-MoE (HF's function, dropless) and DeepSeek-V3 (shared
experts, a dense first layer, group-limited sigmoid routing) trained with a capacity
factor so that drops happen and are logged. Each run must lower the loss, write a
``metrics.jsonl`` record per step with the per-block drop fractions and collapse
metrics, and save a model that plain ``transformers`` reloads with the expert-parallel
model's logits on the probe batch (checked by the script on rank 0, and again here).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.launcher import REPO, clean_env, free_port

SCRIPT = str(REPO / "launch" / "finetune_hf.py")
RUNS = {
    "qwen3_moe": ([], ["model.layers.0.mlp", "model.layers.1.mlp"], False),
    "deepseek_v3": (["--capacity-factor", "1.0", "--min-capacity", "1"], ["model.layers.1.mlp"], True),
}


@pytest.mark.parametrize("family", sorted(RUNS))
def test_finetune_hf_20_steps_ep2_under_torchrun(tmp_path: Path, family: str) -> None:
    extra, blocks, drops = RUNS[family]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, "--family", family, "--steps", "20", "--seq-len", "32", "--hidden-size", "32", "--ffn", "48",
           "--experts", "8", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "step    20 | loss" in proc.stdout and "drop" in proc.stdout
    with open(out / "finetune.json") as fh:
        res = json.load(fh)
    assert res["world_size"] == 2 and res["ep_size"] == 2
    assert res["replaced_blocks"] == blocks
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # byte-level LM from about ln(256) = 5.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for rec in records:
        assert set(rec["layers"]) == set(blocks) and 0.0 <= rec["drop_fraction"] <= 1.0
        assert 0.0 <= rec["a2a_share"] < 1.0 and rec["tokens_per_s"] > 0
    if drops:
        assert res["moe_overrides"] == {"capacity_factor": 1.0, "min_capacity": 1}
        assert max(r["drop_fraction"] for r in records) > 0.0  # the capacity bites, and is counted
    else:
        assert all(r["drop_fraction"] == 0.0 for r in records)  # HF's function: dropless
    for block in blocks:
        m = res["collapse"][block]
        assert m["window_steps"] == 20 and 0.0 < m["routing_entropy_norm"] <= 1.0
        assert 1 / 8 <= m["max_expert_share"] <= 1.0 and 0 <= m["dead_experts"] <= 8
    assert res["gathered_vs_ep_logits_rel"] <= 1e-5
    assert res["reloaded_vs_ep_logits_rel"] <= 1e-5

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(res["hf_model"]).eval()
    assert type(model).__name__ == res["model_class"] == res["reloaded_class"]
    probe, want = torch.load(out / "probe_ids.pt"), torch.load(out / "probe_logits.pt")
    with torch.no_grad():
        got = model(input_ids=probe).logits
    assert (got - want).abs().max() / want.abs().max() <= 1e-5
