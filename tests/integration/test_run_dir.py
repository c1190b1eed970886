"""A run directory is never silently mixed or lost (the issue's new-user walk-through).

Real launcher runs (torchrun, 2 ranks, tiny model): a second run into an ``--out`` that
holds a run is refused with one line naming ``--resume`` and ``--overwrite`` and changes
nothing there; ``--overwrite`` starts cleanly; ``latest`` always names a checkpoint that
exists; a resume at or past ``max_steps`` is an error, not a quiet success. Retention
(keep the checkpoint just written) is checked in-process on the manager, which both
engines use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from expert_parallel.checkpoint import manager as ckpt
from tests.integration.launcher import metrics, summary, torchrun

pytestmark = pytest.mark.timeout(600)

RUN = ("--ep-size", "2", "--eval-every", "100", "--ckpt-every", "2", "--keep-checkpoints", "2",
       "--host-allocator", "glibc")


def snapshot(out: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``out``: content hash and modification time (ns)."""
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def assert_latest_exists(out: Path) -> str:
    name = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / name / "manifest.json").is_file(), name
    return name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    torchrun(2, out, *RUN, "--max-steps", "6")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert assert_latest_exists(out) == "step_00000006"
    return out


@pytest.fixture()
def first_run(trained, tmp_path) -> Path:
    """A private copy of a finished 6-step run (checkpoints at steps 4 and 6)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_second_run_is_refused_and_changes_nothing(first_run) -> None:
    before = snapshot(first_run)
    proc = torchrun(2, first_run, *RUN, "--max-steps", "2", check=False, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "train.py: error:" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr  # one line, from the first rank only
    assert f"--out {first_run} already holds a run" in lines[0]
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert snapshot(first_run) == before  # not a byte, not a timestamp


def test_overwrite_starts_cleanly(first_run) -> None:
    torchrun(2, first_run, *RUN, "--max-steps", "3", "--overwrite")
    assert [r["step"] for r in metrics(first_run)] == [1, 2, 3]  # the old run's 6 lines are gone
    assert summary(first_run)["steps"] == 3
    assert sorted(p.name for p in (first_run / "checkpoints").iterdir()) == \
        ["latest", "step_00000002", "step_00000003"]  # none of the old step_4..6
    assert assert_latest_exists(first_run) == "step_00000003"
    with open(first_run / "config.json") as fh:
        assert json.load(fh)["max_steps"] == 3


def test_resume_at_or_past_max_steps_is_an_error(first_run) -> None:
    before = snapshot(first_run)
    for max_steps in ("6", "3"):
        proc = torchrun(2, first_run, *RUN, "--max-steps", max_steps, "--resume", check=False, timeout=120)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert text.count(f"checkpoint {first_run / 'checkpoints' / 'step_00000006'} is at step 6, at or past "
                          f"--max-steps {max_steps}") == 1, text
    assert snapshot(first_run) == before  # summary, metrics and config of the old run intact


def test_resume_continues_the_same_run(first_run) -> None:
    torchrun(2, first_run, *RUN, "--max-steps", "8", "--resume")
    assert [r["step"] for r in metrics(first_run)] == list(range(1, 9))  # one run, continued
    assert summary(first_run)["steps"] == 8 and summary(first_run)["steps_this_run"] == 2
    assert assert_latest_exists(first_run) == "step_00000008"
    assert sorted(p.name for p in (first_run / "checkpoints").iterdir() if p.is_dir()) == \
        ["step_00000006", "step_00000008"]  # keep 2


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path) -> None:
    """The issue's case: steps 300-500 exist and step 5 is written into the same root
    (keep 3). Sorting by name kept 300-500 and deleted step 5 at once, leaving ``latest``
    naming it. Now step 5 stays and is ``latest``; the newer ones, an abandoned line
    of training, are removed so a later resume cannot pick them over it."""
    root = tmp_path / "checkpoints"
    for step in (300, 400, 500):
        ckpt.save_checkpoint(str(root), step, {"w": torch.full((2,), float(step))}, {"step": step}, {}, 0, None,
                             keep=3)
    log: list[str] = []
    final = ckpt.save_checkpoint(str(root), 5, {"w": torch.zeros(2)}, {"step": 5}, {}, 0, None, keep=3,
                                 log=log.append)
    assert Path(final).is_dir() and ckpt.verify(final) == (True, "ok")
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert ckpt.complete_checkpoints(str(root)) == ["step_00000005"]
    assert len(log) == 3 and all("newer than the one just written" in line for line in log)
    assert ckpt.find_latest(str(root)) == final


def test_retention_keeps_the_newest_older_ones(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(str(root), step, {"w": torch.zeros(1)}, {"step": step}, {}, 0, None, keep=2)
        assert (root / "latest").read_text().strip() == f"step_{step:08d}"
    assert ckpt.complete_checkpoints(str(root)) == ["step_00000003", "step_00000004"]
    # Re-saving an existing step replaces it; latest names it again afterwards.
    ckpt.save_checkpoint(str(root), 4, {"w": torch.ones(1)}, {"step": 4}, {}, 0, None, keep=2)
    assert ckpt.complete_checkpoints(str(root)) == ["step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
