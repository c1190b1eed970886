"""Live expert re-placement in the launcher (``--rebalance-every``, ``--num-redundant-experts``).

Placement changes where experts compute, never what the model computes:
* 30 steps at EP=4 with one redundant slot per rank and a re-placement at steps 10 and 20
  follow the loss trajectory of the same run without re-placement (fp32 tolerance: the
  expert GEMMs see other row batches, replica gradients are summed in another order);
* a run saved under one placement at EP=4 resumes under another at EP=2 (and another
  slot count) with the continued losses of the uninterrupted run;
* replicas stay bit-identical (the replica check runs every step and would raise).
"""

from __future__ import annotations

import shutil

import pytest

from tests.integration.launcher import losses, summary, torchrun

# Aux loss off, so the routing stays skewed and a re-placement really moves experts.
COMMON = ["--num-experts", "8", "--aux-loss-coeff", "0", "--capacity-factor", "1.5", "--replica-check-every", "1",
          "--eval-every", "100"]


def _close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=2e-5, abs=2e-5), (step, a[step], b[step])


def test_replacement_keeps_the_loss_trajectory(tmp_path) -> None:
    moved, still = tmp_path / "moved", tmp_path / "still"
    torchrun(4, moved, "--ep-size", "4", "--num-redundant-experts", "4", "--rebalance-every", "10",
             "--max-steps", "30", "--ckpt-every", "0", *COMMON, timeout=600)
    torchrun(4, still, "--ep-size", "4", "--num-redundant-experts", "4", "--max-steps", "30",
             "--ckpt-every", "0", *COMMON, timeout=600)
    _close(losses(moved), losses(still), range(1, 31))
    history = summary(moved)["rebalances"]
    assert [r["step"] for r in history] == [10, 20, 30]
    layers = [layer for r in history[:2] for layer in r["layers"].values()]
    assert any(layer["moved"] for layer in layers)
    # The planner's table is at least as balanced as the one it replaced, for the window's load.
    assert all(layer["predicted_after"] <= layer["predicted_before"] + 1e-9 for layer in layers)
    assert summary(still)["rebalances"] == []


def test_resume_under_another_placement_and_ep_size(tmp_path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(4, full, "--ep-size", "4", "--num-redundant-experts", "4", "--rebalance-every", "4",
             "--max-steps", "12", "--ckpt-every", "8", *COMMON, timeout=600)
    (part / "checkpoints").mkdir(parents=True)
    ckpt = full / "checkpoints" / "step_00000008"
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    # EP=2 on the same 4 ranks (same tokens per rank, so the same capacity), 2 redundant
    # slots, another table: the checkpoint's per-logical-expert keys load into it.
    torchrun(4, part, "--ep-size", "2", "--num-redundant-experts", "2", "--rebalance-every", "3",
             "--max-steps", "12", "--ckpt-every", "8", *COMMON, "--resume", timeout=600)
    got = losses(part)
    assert sorted(got) == [9, 10, 11, 12]
    _close(got, losses(full), range(9, 13))
