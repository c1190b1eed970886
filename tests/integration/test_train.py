"""The launcher, run for real under torchrun (issue 4).

Each test reads the JSON files the launcher writes. Runs are tiny (see ``launcher.TINY``)
so the module stays around two minutes on 2 cores.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tests.integration.launcher import final_checkpoint_tensors, losses, metrics, summary, torchrun

STEPS = 6


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory) -> dict:
    """The same seed and global batch at 4 ranks with EP = 1, 2, 4 (DP = 4, 2, 1)."""
    runs = {}
    for ep in (1, 2, 4):
        out = tmp_path_factory.mktemp(f"ep{ep}")
        torchrun(4, out, "--ep-size", str(ep), "--max-steps", str(STEPS), "--ckpt-every", "4",
                 "--eval-every", "3")
        runs[ep] = out
    return runs


def test_two_and_four_processes_write_metrics_and_summary(tmp_path, ep_runs) -> None:
    torchrun(2, tmp_path, "--ep-size", "2", "--max-steps", "3")
    for out, world, ep in ((tmp_path, 2, 2), (ep_runs[4], 4, 4)):
        s = summary(out)
        assert s["world_size"] == world and s["ep_size"] == ep
        assert s["steps"] == len(metrics(out)) == (3 if world == 2 else STEPS)
        for key in ("final_train_loss", "final_val_loss", "tokens_per_s", "drop_fraction_per_layer",
                    "tokens_per_expert", "report_png"):
            assert key in s, key
        assert 0 < s["final_train_loss"] < 10 and s["tokens_per_s"] > 0
        for layer in s["collapse"].values():  # expert-collapse metrics per MoE layer
            assert 0 < layer["routing_entropy_norm"] <= 1.0 + 1e-6
            assert 0 <= layer["dead_experts"] <= 4 and 0 < layer["max_expert_share"] <= 1
        assert (out / "report.png").stat().st_size > 1000
        for rec in metrics(out):
            assert {"loss", "aux_loss", "drop_fraction", "a2a_share", "tokens_per_s"} <= set(rec)
            assert 0.0 <= rec["drop_fraction"] <= 1.0


def test_same_loss_trajectory_at_ep_1_2_4(ep_runs) -> None:
    ref = losses(ep_runs[1])
    assert sorted(ref) == list(range(1, STEPS + 1))
    for ep in (2, 4):
        got = losses(ep_runs[ep])
        for step, value in ref.items():
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-5), (ep, step)
    # The final models agree too (checkpoint keys name global experts, so they match).
    want = final_checkpoint_tensors(ep_runs[1])
    for ep in (2, 4):
        got = final_checkpoint_tensors(ep_runs[ep])
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor) and not key.startswith("optim."):
                assert torch.allclose(got[key], value, atol=1e-5, rtol=1e-4), (ep, key)


def test_validation_loss_falls_on_default_data(tmp_path) -> None:
    torchrun(2, tmp_path, "--ep-size", "2", "--max-steps", "60", "--eval-every", "10",
             "--warmup-steps", "5", "--lr", "0.01", "--ckpt-every", "0", timeout=300)
    vals = [r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r]
    assert len(vals) == 6
    s = summary(tmp_path)
    assert s["initial_val_loss"] == pytest.approx(math.log(256), abs=0.1)  # untrained: uniform
    assert vals[-1] < vals[0] - 0.2, vals  # still falling after the first 10 steps
    assert s["final_val_loss"] < s["initial_val_loss"] - 2.0, s  # ~5.5 -> below 3.5 nats/byte


def test_stop_and_resume_is_bitwise_identical(tmp_path, ep_runs) -> None:
    full = ep_runs[2]  # uninterrupted, EP=2 on 4 ranks
    part = tmp_path / "resumed"
    torchrun(4, part, "--ep-size", "2", "--max-steps", str(STEPS), "--stop-after", "4",
             "--ckpt-every", "4", "--eval-every", "3")
    assert max(losses(part)) == 4
    torchrun(4, part, "--ep-size", "2", "--max-steps", str(STEPS), "--ckpt-every", "4",
             "--eval-every", "3", "--resume")
    assert losses(part) == losses(full)  # exact float equality
    a, b = final_checkpoint_tensors(full), final_checkpoint_tensors(part)
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("old_ep,new_ep", [(4, 2), (4, 1), (1, 4)])
def test_checkpoint_reshards_between_ep_sizes(tmp_path, ep_runs, old_ep, new_ep) -> None:
    src = ep_runs[old_ep]  # wrote checkpoints at steps 4 and 6
    dst = tmp_path / f"ep{new_ep}"
    (dst / "checkpoints").mkdir(parents=True)
    ckpt = src / "checkpoints" / "step_00000004"
    shutil.copytree(ckpt, dst / "checkpoints" / ckpt.name)
    torchrun(4, dst, "--ep-size", str(new_ep), "--max-steps", str(STEPS), "--ckpt-every", "4",
             "--eval-every", "3", "--resume")
    want = losses(src)
    got = losses(dst)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), step
