"""The project's sbatch scripts on a real two-node SLURM cluster emulated on this machine.

``scripts/cluster/start.sh`` starts munge, slurmctld and one slurmd per node, each node
in its own network namespace (own address and host name) joined by a veth pair. The
jobs below are submitted with the unmodified ``launch/slurm/*.sbatch`` scripts; command
line options only shrink the resources (2 placeholder GPUs, 2 CPUs per node).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.cluster_util import STEPS, assert_same_losses
from tests.integration.launcher import REPO, TINY, clean_env, losses, metrics, summary

SCRIPTS = REPO / "scripts" / "cluster"
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


REASON = _unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"emulated SLURM cluster: {REASON}")


class Cluster:
    def __init__(self, root: Path, prefix: str) -> None:
        self.dir, self.prefix = root / "cluster", prefix

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` on node n1 (the login and controller node)."""
        full = [str(SCRIPTS / "run.sh"), "--dir", str(self.dir), *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
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

    def submit(self, script: str, out: Path, *args: str, export: str = "") -> str:
        env_args = ["env", f"PYTHON={sys.executable}", f"OUT={out / 'run'}"] + ([export] if export else [])
        proc = self.run(*env_args, "sbatch", "--parsable", "--gpus-per-node=2", "--time=10",
                        f"--output={out}/%x-%j.out", *self._shrink(script), str(REPO / script), *args)
        return proc.stdout.strip().split(";")[0]

    @staticmethod
    def _shrink(script: str) -> list[str]:
        if script.endswith("train_srun.sbatch"):
            return ["--ntasks-per-node=2", "--cpus-per-task=1"]
        return ["--cpus-per-task=2"]

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
    prefix = f"ept{os.getpid() % 100000}"
    c = Cluster(root, prefix)
    env = clean_env()
    start = subprocess.run([str(SCRIPTS / "start.sh"), "--dir", str(c.dir), "--prefix", prefix, "--cpus", "2"],
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


def _job_timing(info: dict[str, str]) -> str:
    return f"job {info['JobId']} {info['JobState']} in {info['RunTime']} on {info['NodeList']}"


def test_train_sbatch_two_nodes_ep_across_nodes(cluster: Cluster, tmp_path: Path) -> None:
    """2 nodes x 2 torchrun ranks, EP=4: every EP group spans both nodes."""
    sent_before = cluster.link_bytes()
    job = cluster.submit("launch/slurm/train.sbatch", tmp_path, *TINY, "--ep-size", "4",
                         "--max-steps", str(STEPS))
    info = cluster.wait(job, timeout=300)
    log = (tmp_path / f"ep-moe-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    print(_job_timing(info))
    assert info["NodeList"] == "n[1-2]"
    assert "2 nodes x 2 procs" in log and "rendezvous n1:29500" in log
    run = tmp_path / "run"
    s = summary(run)
    assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, STEPS)
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    assert_same_losses(losses(run))
    # The all-to-all really crossed the link between the two node namespaces.
    assert cluster.link_bytes() - sent_before > 200_000


def test_srun_direct_sbatch(cluster: Cluster, tmp_path: Path) -> None:
    """One srun task per rank (no torchrun): ranks from SLURM_PROCID, master from the nodelist."""
    job = cluster.submit("launch/slurm/train_srun.sbatch", tmp_path, *TINY, "--ep-size", "4",
                         "--max-steps", str(STEPS))
    info = cluster.wait(job, timeout=300)
    log = (tmp_path / f"ep-moe-srun-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    print(_job_timing(info))
    assert "4 ranks on 2 nodes" in log
    s = summary(tmp_path / "run")
    assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, STEPS)
    assert_same_losses(losses(tmp_path / "run"))


def test_scancel_leaves_no_process(cluster: Cluster, tmp_path: Path) -> None:
    job = cluster.submit("launch/slurm/train.sbatch", tmp_path, *TINY, "--ep-size", "4",
                         "--max-steps", "100000", "--eval-every", "100000", "--ckpt-every", "100000")
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics_file.exists() and metrics_file.stat().st_size > 0):
        assert time.monotonic() < deadline, "the job never started training"
        assert cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")
        time.sleep(1)
    # Training is running: both nodes have a torchrun agent and ranks.
    assert len(cluster.job_processes()) >= 6
    cluster.run("scancel", job)
    deadline = time.monotonic() + 60
    while cluster.job_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.job_processes() == []
    assert cluster.wait(job, timeout=60)["JobState"] == "CANCELLED"
    # Nothing outside the namespaces either (e.g. a rank that escaped its node).
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True).returncode == 1
