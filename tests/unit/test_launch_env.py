"""Rank discovery from pure environment dicts: every launcher, precedence, every error."""

from __future__ import annotations

from datetime import timedelta

import pytest

from expert_parallel.distributed import launch_env
from expert_parallel.distributed.launch_env import (
    RankInfo,
    discover_rank_info,
    expand_hostlist,
    parse_tasks_per_node,
)

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "6", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
SRUN = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1"}


# ---------------------------------------------------------------------------- launchers

def test_no_launcher_is_a_single_process() -> None:
    assert discover_rank_info({}) == RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")
    assert discover_rank_info({"PATH": "/bin", "HOME": "/root"}).launcher == "single"


def test_torchrun() -> None:
    assert discover_rank_info(TORCHRUN) == RankInfo(5, 8, 1, 4, "node-a", 29500, "torchrun")


def test_hand_written_env_launch_without_local_variables() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert discover_rank_info(env) == RankInfo(1, 2, 0, 1, "h", 1234, "torchrun")
    # LOCAL_RANK without LOCAL_WORLD_SIZE: the whole world is the only safe bound.
    assert discover_rank_info({**env, "LOCAL_RANK": "1"}).local_world_size == 2


def test_torchrun_world_of_one_needs_no_master() -> None:
    assert discover_rank_info({"RANK": "0", "WORLD_SIZE": "1"}) == RankInfo(0, 1, 0, 1, "127.0.0.1", 0, "torchrun")


def test_open_mpi_without_master_leaves_rendezvous_to_mpi4py() -> None:
    assert discover_rank_info(OMPI) == RankInfo(3, 4, 1, 2, "", 0, "mpi")


def test_open_mpi_with_exported_master() -> None:
    info = discover_rank_info({**OMPI, "MASTER_ADDR": "login1", "MASTER_PORT": "6000"})
    assert (info.master_addr, info.master_port, info.launcher) == ("login1", 6000, "mpi")


def test_mpich_pmi() -> None:
    assert discover_rank_info(MPICH) == RankInfo(2, 6, 2, 3, "", 0, "mpi")


def test_pmi_without_local_size_uses_world_as_bound() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    assert discover_rank_info(env) == RankInfo(1, 2, 1, 2, "", 0, "mpi")


def test_srun_direct_uses_step_tasks_and_first_step_node() -> None:
    info = discover_rank_info(SRUN)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 5, 0, 2)
    assert info.master_addr == "gpu07" and info.launcher == "slurm"
    # The port is derived from job and step ids: the same on every task, in range.
    assert info.master_port == discover_rank_info({**SRUN, "SLURM_PROCID": "0", "SLURM_NODEID": "0"}).master_port
    assert 15000 <= info.master_port < 30000
    assert info.master_port != discover_rank_info({**SRUN, "SLURM_STEP_ID": "2"}).master_port


def test_srun_falls_back_to_job_variables() -> None:
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "n[1-3,5]", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "7"}
    info = discover_rank_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (1, 4, 1, 2)
    assert info.master_addr == "n1"


def test_srun_honours_exported_master() -> None:
    info = discover_rank_info({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29400)


def test_sbatch_batch_shell_without_srun_is_one_process() -> None:
    # The batch script has SLURM_PROCID=0 and the job's --ntasks, but no step.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    assert discover_rank_info(env).launcher == "single"
    assert discover_rank_info(env).world_size == 1


# --------------------------------------------------------------------------- precedence

def test_torchrun_wins_over_slurm_and_mpi() -> None:
    # torchrun started by srun (one agent per node) or by mpirun: RANK describes the rank.
    assert discover_rank_info({**SRUN, **OMPI, **TORCHRUN}).launcher == "torchrun"
    assert discover_rank_info({**SRUN, **OMPI, **TORCHRUN}).rank == 5


def test_mpi_wins_over_slurm() -> None:
    # mpirun inside an sbatch allocation: the batch step's SLURM_PROCID is not the rank.
    info = discover_rank_info({**SRUN, **OMPI})
    assert (info.launcher, info.rank, info.world_size) == ("mpi", 3, 4)


# ----------------------------------------------------------------------------- hostlists

@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("a,b[2-3]-ib,c", ["a", "b2-ib", "b3-ib", "c"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("node[7]", ["node7"]),
    ],
)
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[1-2-3]", "a,,b"])
def test_bad_hostlist_names_the_value(spec: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(spec)


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE='2\(3\)'"):
        parse_tasks_per_node("2(3)")


# --------------------------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({**TORCHRUN, "RANK": "two"}, "RANK='two' is not an integer"),
        ({**TORCHRUN, "RANK": "8"}, "RANK=8 must be smaller than WORLD_SIZE=8"),
        ({**TORCHRUN, "RANK": "-1"}, "RANK='-1' must be >= 0"),
        ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be >= 1"),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, "LOCAL_RANK=4 must be smaller than LOCAL_WORLD_SIZE=4"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE=9 must be between 1 and WORLD_SIZE=8"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "needs MASTER_ADDR"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "needs MASTER_PORT"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT='70000' must be <= 65535"),
        ({**TORCHRUN, "MASTER_PORT": "x"}, "MASTER_PORT='x' is not an integer"),
        ({**OMPI, "OMPI_COMM_WORLD_SIZE": "3"}, "OMPI_COMM_WORLD_RANK=3 must be smaller than OMPI_COMM_WORLD_SIZE=3"),
        ({k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_SIZE"}, "OMPI_COMM_WORLD_SIZE is not set"),
        ({k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_RANK"}, "no local rank variable"),
        ({**OMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "1.5"}, "OMPI_COMM_WORLD_LOCAL_RANK='1.5' is not an integer"),
        ({**MPICH, "PMI_SIZE": ""}, "PMI_SIZE is not set"),
        ({**MPICH, "MPI_LOCALRANKID": "3"}, "MPI_LOCALRANKID=3 must be smaller than MPI_LOCALNRANKS=3"),
        ({**SRUN, "SLURM_PROCID": "5"}, "SLURM_PROCID=5 must be smaller than SLURM_STEP_NUM_TASKS=5"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
        ({**SRUN, "SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 must be smaller than SLURM_STEP_TASKS_PER_NODE=2"),
        ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside SLURM_STEP_TASKS_PER_NODE='3,2'"),
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3;2"}, "SLURM_STEP_TASKS_PER_NODE='3;2'"),
        ({**SRUN, "SLURM_STEP_NODELIST": "gpu[07-"}, "hostlist='gpu\\[07-'"),
        ({k: v for k, v in SRUN.items() if not k.endswith("NODELIST")}, "needs SLURM_STEP_NODELIST"),
    ],
)
def test_errors_name_the_variable_and_value(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        discover_rank_info(env)


def test_bad_launcher_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="launcher must be one of"):
        RankInfo(0, 1, 0, 1, "h", 1, "pbs")


# ------------------------------------------------------------------- init without a group

def test_init_distributed_single_process_initialises_nothing(monkeypatch) -> None:
    import torch.distributed as dist

    for key in list(launch_env.os.environ):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")) or key in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    info = launch_env.init_distributed(timeout=timedelta(seconds=5))
    assert info.launcher == "single" and info.world_size == 1
    assert not dist.is_initialized()
    launch_env.shutdown()  # safe with no group


def test_init_distributed_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="timeout must be a datetime.timedelta, got 30"):
        launch_env.init_distributed(timeout=30)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backend must be a str or None, got 1"):
        launch_env.init_distributed(backend=1)  # type: ignore[arg-type]


def test_init_distributed_torchrun_world_of_one_creates_a_group(monkeypatch) -> None:
    import torch.distributed as dist

    for key in list(launch_env.os.environ):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")):
            monkeypatch.delenv(key)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    try:
        info = launch_env.init_distributed(backend="gloo", timeout=timedelta(seconds=30))
        assert dist.is_initialized() and dist.get_world_size() == 1
        # A free port was picked and exported for anything else that reads env://.
        assert info.master_port > 0 and launch_env.os.environ["MASTER_PORT"] == str(info.master_port)
        assert launch_env.init_distributed(backend="gloo") == info  # idempotent
    finally:
        launch_env.shutdown()
    assert not dist.is_initialized()
