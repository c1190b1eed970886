"""Shared helpers of the cluster launch tests (mpirun, emulated SLURM, Docker).

The single-process reference run is the numerical yardstick: the launcher at any world
size and EP size must follow its loss trajectory on the same seed and global batch.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from tests.integration.launcher import REPO, TINY, TRAIN, clean_env, losses

STEPS = 3
# Loss agreement with the single-process run: ranks see different local token counts,
# so per-rank capacity (and drops) differ slightly; a missing or doubled gradient sync
# moves the step-3 loss by > 1e-3.
LOSS_RTOL = 1e-4
PROBE = str(REPO / "tests" / "integration" / "rank_probe.py")


@lru_cache(maxsize=None)
def reference_losses(steps: int = STEPS) -> dict[int, float]:
    """Loss per step of ``python launch/train.py`` in one process, EP=1 (cached)."""
    out = Path(tempfile.mkdtemp(prefix="ep-ref-"))
    cmd = [sys.executable, TRAIN, *TINY, "--max-steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"reference run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return losses(out)


def assert_same_losses(got: dict[int, float], steps: int = STEPS) -> None:
    want = reference_losses(steps)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step, value in want.items():
        assert abs(got[step] - value) <= LOSS_RTOL * abs(value), (step, got[step], value)
