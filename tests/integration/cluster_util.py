"""Shared helpers of the cluster launch tests (mpirun, emulated SLURM, Docker).

The single-process reference run is the numerical yardstick: the launcher at any world
size and EP size must follow its loss trajectory on the same seed and global batch.
:class:`Cluster` and the module-scoped ``cluster`` fixture start the emulated two-node
cluster (``scripts/cluster/start.sh``) for the SLURM and the two-node mpirun tests.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pytest

from tests.integration.launcher import REPO, TINY, TRAIN, clean_env, losses

STEPS = 3
# Loss agreement with the single-process run: ranks see different local token counts,
# so per-rank capacity (and drops) differ slightly; a missing or doubled gradient sync
# moves the step-3 loss by > 1e-3.
LOSS_RTOL = 1e-4
PROBE = str(REPO / "tests" / "integration" / "rank_probe.py")
SCRIPTS = REPO / "scripts" / "cluster"


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


# ============================================================ the emulated cluster
NEEDED = ("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and slurmd"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return f"missing {missing} (apt-get install slurm-wlm munge iproute2)"
    probe = f"epprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


EMULATED_CLUSTER_MISSING = _unavailable()
"""Why scripts/cluster/start.sh cannot run here, or None."""
README_SUBMIT = re.compile(r"scripts/cluster/run\.sh sbatch ((?:--\S+ )+)launch/slurm/(\w+)\.sbatch")
_CLUSTERS = itertools.count()


def readme_options() -> dict[str, list[str]]:
    """The sbatch options of the README's emulated-cluster examples, per script: the
    tests submit with exactly these, so the README's lines are what runs here."""
    found = {f"launch/slurm/{name}.sbatch": opts.split()
             for opts, name in README_SUBMIT.findall((REPO / "README.md").read_text())}
    assert set(found) == {"launch/slurm/train.sbatch", "launch/slurm/train_srun.sbatch"}, found
    return found


class Cluster:
    """A cluster started by scripts/cluster/start.sh; commands run as its nodes."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.dir, self.prefix = root / "cluster", prefix

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, node: int = 1,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on node ``node`` (n1: the login and controller node), in ``env``
        (default: this checkout first on PYTHONPATH, no launcher variables). sbatch hands
        the environment to the job, so jobs run this checkout's code too."""
        full = [str(SCRIPTS / "run.sh"), "--dir", str(self.dir), "--node", str(node), *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env=clean_env() if env is None else env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed: {proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout}s")

    def submit(self, script: str, out: Path, *args: str, export: str = "",
               options: list[str] | None = None, check: bool = True) -> str | subprocess.CompletedProcess:
        """sbatch ``script`` with the README's options (or ``options``); the job id, or
        the completed sbatch when ``check`` is False."""
        env_args = ["env", f"PYTHON={sys.executable}", f"OUT={out / 'run'}"] + ([export] if export else [])
        if options is None:
            options = readme_options()[script]
        proc = self.run(*env_args, "sbatch", "--parsable", f"--output={out}/%x-%j.out", *options,
                        str(REPO / script), *args, check=check)
        return proc.stdout.strip().split(";")[0] if check else proc

    def link_bytes(self) -> int:
        """Bytes n1 sent to n2 over the veth link so far."""
        # Asked from outside: /sys inside a node still shows the host's interfaces.
        out = subprocess.run(["ip", "-j", "-s", "-n", f"{self.prefix}-n1", "link", "show", "dev",
                              f"{self.prefix}-v1"], capture_output=True, text=True, check=True).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def job_processes(self) -> list[str]:
        """Processes in the node namespaces other than the cluster's own daemons."""
        left = []
        for node in (1, 2):
            pids = subprocess.run(["ip", "netns", "pids", f"{self.prefix}-n{node}"],
                                  capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue  # exited meanwhile
                if comm not in ("slurmctld", "slurmd", "slurmscriptd"):
                    left.append(f"{pid}:{comm}")
        return left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    prefix = f"ept{os.getpid() % 10000}{next(_CLUSTERS)}"  # veth names: at most 15 characters
    c = Cluster(root, prefix)
    env = clean_env()
    # start.sh's defaults (4 CPUs, 2 GPUs per node): what the README's example meets.
    start = subprocess.run([str(SCRIPTS / "start.sh"), "--dir", str(c.dir), "--prefix", prefix],
                           capture_output=True, text=True, timeout=120, env=env)
    assert start.returncode == 0, f"start.sh failed:\n{start.stdout}\n{start.stderr}"
    try:
        yield c
    finally:
        stop = subprocess.run([str(SCRIPTS / "stop.sh"), "--dir", str(c.dir), "--prefix", prefix],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, f"stop.sh left processes behind:\n{stop.stdout}\n{stop.stderr}"
        assert not Path(f"/run/netns/{prefix}-n1").exists()
        assert subprocess.run(["pgrep", "-f", str(c.dir)], capture_output=True).returncode == 1
