"""The project's sbatch scripts on a real two-node SLURM cluster emulated on this machine.

``scripts/cluster/start.sh`` starts munge, slurmctld and one slurmd per node, each node
in its own network namespace (own address and host name) joined by a veth pair. The
jobs below are submitted with the unmodified ``launch/slurm/*.sbatch`` scripts; the
sbatch options that shrink them to the emulated nodes (2 placeholder GPUs, 4 CPUs) are
read from the README's own example lines (``cluster_util.readme_options``), so the
README's commands are what runs here. Submitted as written (8 GPUs, 32 CPUs per node) the
scripts are refused by sbatch.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.cluster_util import EMULATED_CLUSTER_MISSING, STEPS, Cluster, assert_same_losses
from tests.integration.cluster_util import cluster  # noqa: F401 (the module-scoped fixture)
from tests.integration.launcher import TINY, losses, metrics, summary

pytestmark = pytest.mark.skipif(EMULATED_CLUSTER_MISSING is not None,
                                reason=f"emulated SLURM cluster: {EMULATED_CLUSTER_MISSING}")


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
    """One srun task per rank (no torchrun): ranks from SLURM_PROCID, master from the
    nodelist, ranks_per_node from SLURM's tasks per node, here driving the hierarchical
    all-to-all (EP=4 = 2 nodes x 2 tasks)."""
    job = cluster.submit("launch/slurm/train_srun.sbatch", tmp_path, *TINY, "--ep-size", "4",
                         "--a2a-algorithm", "hierarchical", "--max-steps", str(STEPS))
    info = cluster.wait(job, timeout=300)
    log = (tmp_path / f"ep-moe-srun-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    print(_job_timing(info))
    assert "4 ranks on 2 nodes" in log
    s = summary(tmp_path / "run")
    assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, STEPS)
    assert _dispatch_facts(tmp_path / "run") == ("hierarchical(ranks_per_node=2)", 2)
    assert_same_losses(losses(tmp_path / "run"))


def test_scripts_as_written_are_refused_at_submission(cluster: Cluster, tmp_path: Path) -> None:
    """8 GPUs / 32 CPUs per node can never start on these nodes: sbatch says so and exits
    non-zero (EnforcePartLimits=ALL), instead of a job pending forever (PartitionConfig)."""
    cases = [
        ("launch/slurm/train.sbatch", [], "More processors requested than permitted"),
        ("launch/slurm/train_srun.sbatch", [], "More processors requested than permitted"),
        # CPUs that fit, GPUs that do not.
        ("launch/slurm/train.sbatch", ["--cpus-per-task=4"], "Requested node configuration is not available"),
    ]
    before = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    for script, opts, reason in cases:
        proc = cluster.submit(script, tmp_path, *TINY, options=opts, check=False)
        assert proc.returncode != 0 and proc.stdout.strip() == "", (script, opts, proc.stdout, proc.stderr)
        assert f"Batch job submission failed: {reason}" in proc.stderr, (script, opts, proc.stderr)
    assert cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before  # nothing queued


def _dispatch_facts(run: Path) -> tuple[str, int]:
    s = summary(run)
    return s["dispatcher"], s["ranks_per_node"]


def test_train_sbatch_hierarchical_two_ranks_per_node(cluster: Cluster, tmp_path: Path) -> None:
    """torchrun per node, 2 ranks each (the node's 2 GPUs), EP=4 over both nodes with the
    hierarchical all-to-all; ranks_per_node is not given: it comes from the launcher
    (train.sbatch: SLURM_GPUS_ON_NODE -> torchrun --nproc-per-node -> LOCAL_WORLD_SIZE)."""
    job = cluster.submit("launch/slurm/train.sbatch", tmp_path, *TINY, "--ep-size", "4",
                         "--a2a-algorithm", "hierarchical", "--max-steps", str(STEPS))
    info = cluster.wait(job, timeout=300)
    log = (tmp_path / f"ep-moe-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    print(_job_timing(info))
    assert info["NodeList"] == "n[1-2]" and "2 nodes x 2 procs" in log
    run = tmp_path / "run"
    s = summary(run)
    assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, STEPS)
    assert _dispatch_facts(run) == ("hierarchical(ranks_per_node=2)", 2)
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    # Same numbers as one process (the hierarchical exchange only reorders the sums).
    assert_same_losses(losses(run))


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
