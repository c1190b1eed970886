"""``mpirun -np N python launch/train.py`` with Open MPI: ranks and EP groups (issue 5).

Ranks come from the OMPI_* variables and the rendezvous from mpi4py (rank 0's host
name and a free port, broadcast), with no MASTER_ADDR anywhere in the environment. One
mpirun also spans the two nodes of the emulated cluster (its remote daemon started
through ``scripts/cluster/node_rsh.sh``, as through ssh): there the ranks per node come
from Open MPI's local size and drive the hierarchical all-to-all.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from tests.integration.cluster_util import (EMULATED_CLUSTER_MISSING, PROBE, SCRIPTS, STEPS, Cluster,
                                            assert_same_losses)
from tests.integration.cluster_util import cluster  # noqa: F401 (the module-scoped fixture)
from tests.integration.launcher import REPO, TINY, TRAIN, clean_env, losses, metrics, summary

MPIRUN = shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

pytestmark = [
    pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt-get install openmpi-bin libopenmpi-dev)"),
    pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py not installed (pip install '.[mpi]')"),
]


def mpirun(np: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # --bind-to none: Open MPI would pin each of 4 ranks to one of 2 cores otherwise.
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np),
           sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.mark.parametrize("np_, ep", [(2, 2), (4, 2)])
def test_mpirun_trains_like_one_process(tmp_path, np_: int, ep: int) -> None:
    mpirun(np_, TRAIN, *TINY, "--ep-size", str(ep), "--max-steps", str(STEPS), "--out", str(tmp_path))
    s = summary(tmp_path)
    assert (s["world_size"], s["ep_size"], s["steps"]) == (np_, ep, STEPS)
    assert len(metrics(tmp_path)) == STEPS
    assert 0 < s["final_val_loss"] < 10 and s["tokens_per_s"] > 0
    assert_same_losses(losses(tmp_path))


def test_mpirun_ranks_and_groups(tmp_path) -> None:
    mpirun(4, PROBE, str(tmp_path), "2", timeout=120)
    recs = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(4)]
    host = socket.gethostname()
    for r, rec in enumerate(recs):
        assert rec["launcher"] == "mpi"
        assert rec["rank"] == rec["dist_rank"] == r and rec["world_size"] == 4
        # One node: local rank = global rank, four local processes.
        assert (rec["local_rank"], rec["local_world_size"]) == (r, 4)
        assert rec["ep_ranks"] == ([0, 1] if r < 2 else [2, 3]) and rec["ep_rank"] == r % 2
        assert rec["edp_ranks"] == ([0, 2] if r % 2 == 0 else [1, 3])
        assert rec["world_sum"] == 1 + 2 + 3 + 4
        assert rec["ep_sum"] == sum(rec["ep_ranks"])
        # The rendezvous was agreed over MPI: rank 0's host name, one port for all, exported.
        assert rec["master_addr"] == host and rec["env"]["MASTER_ADDR"] == host
        assert rec["master_port"] == recs[0]["master_port"] > 0
        assert rec["env"]["RANK"] == str(r) and rec["env"]["WORLD_SIZE"] == "4"


@pytest.mark.skipif(EMULATED_CLUSTER_MISSING is not None,
                    reason=f"emulated cluster: {EMULATED_CLUSTER_MISSING}")
def test_mpirun_two_nodes_hierarchical(cluster: Cluster, tmp_path) -> None:
    """mpirun on n1 with 2 ranks on each node, EP=4 across the link, --a2a-algorithm
    hierarchical and no --ranks-per-node: OMPI_COMM_WORLD_LOCAL_SIZE=2 is what splits the
    exchange into its node-local and cross-node hops."""
    env = {**clean_env(), "CLUSTER_DIR": str(cluster.dir)}  # for node_rsh.sh
    sent_before = cluster.link_bytes()
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-H", "n1:2,n2:2",
           "-np", "4", "--mca", "plm_rsh_agent", str(SCRIPTS / "node_rsh.sh"),
           # The daemons and the MPI byte transport on the link, not on the host's interfaces.
           "--mca", "oob_tcp_if_include", "10.77.0.0/24", "--mca", "btl_tcp_if_include", "10.77.0.0/24",
           sys.executable, TRAIN, *TINY, "--ep-size", "4", "--a2a-algorithm", "hierarchical",
           "--max-steps", str(STEPS), "--out", str(tmp_path)]
    proc = cluster.run(*cmd, timeout=300, check=False, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    s = summary(tmp_path)
    assert (s["world_size"], s["ep_size"], s["steps"]) == (4, 4, STEPS)
    assert (s["dispatcher"], s["ranks_per_node"]) == ("hierarchical(ranks_per_node=2)", 2)
    assert len(metrics(tmp_path)) == STEPS
    assert_same_losses(losses(tmp_path))
    assert cluster.link_bytes() - sent_before > 100_000  # the ranks on n2 really were on n2
