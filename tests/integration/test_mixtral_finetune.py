"""The Mixtral fine-tuning example under torchrun (2 ranks, EP=2), read from its files.

It must train (loss falls), log collapse metrics per block, and save a Hugging Face
model that a plain ``MixtralForCausalLM.from_pretrained`` loads and that reproduces the
expert-parallel model's logits on the probe batch.
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

SCRIPT = str(REPO / "launch" / "finetune_mixtral.py")


def test_finetune_mixtral_ep2_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", SCRIPT, "--steps", "5", "--seq-len", "32",
           "--hidden-size", "32", "--intermediate-size", "48", "--experts", "4",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(out / "finetune.json") as fh:
        res = json.load(fh)
    assert res["world_size"] == 2 and res["ep_size"] == 2
    assert res["replaced_blocks"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses  # byte-level LM from ln(256) = 5.5: falls fast
    for block in res["replaced_blocks"]:
        m = res["collapse"][block]
        assert m["window_steps"] == 5
        assert 0.0 < m["routing_entropy_norm"] <= 1.0
        assert 0.25 <= m["max_expert_share"] <= 1.0  # 4 experts: at least the uniform share
        assert 0 <= m["dead_experts"] <= 4
    assert res["gathered_vs_ep_logits_max_abs_diff"] <= 1e-5

    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(res["hf_model"]).eval()
    probe = torch.load(out / "probe_ids.pt")
    want = torch.load(out / "probe_logits.pt")
    with torch.no_grad():
        got = model(input_ids=probe).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
