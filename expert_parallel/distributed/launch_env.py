"""Rank discovery and process-group start-up for every launcher, in one place.

``discover_rank_info(environ)`` is a pure function of the environment. It understands

* **torchrun** (and any ``env://`` launcher): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* **MPI**: Open MPI (``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``), MPICH / Intel
  MPI / PMI (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``);
* **SLURM srun-direct** (one task per GPU): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  (or ``SLURM_NTASKS``), ``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE`` and the master
  host taken as the first name of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``
  (hostlist syntax such as ``gpu[01-04,07]`` is expanded here).

Precedence is torchrun > MPI > SLURM. torchrun wins because it is often started *by*
srun or mpirun (one agent per node), so the outer launcher's variables describe agents,
not training ranks. MPI wins over SLURM for the same reason: ``mpirun`` inside an
``sbatch`` allocation starts its daemons with srun, and the batch step's ``SLURM_PROCID``
says nothing about MPI ranks.

``init_distributed()`` turns the result into an initialised default process group: under
MPI with no ``MASTER_ADDR`` it uses mpi4py so that rank 0 picks its host name and a free
port and broadcasts them; then it exports the ``env://`` variables and calls
``torch.distributed.init_process_group`` with the backend from ``device.py``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch.distributed as dist

from expert_parallel.distributed.device import default_backend

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")

# srun-direct jobs get a port derived from the job id, so every task computes the same
# one without talking; the range stays clear of the Linux ephemeral ports (32768+).
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 15000


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and how ranks find rank 0."""

    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    """Number of training processes in the job."""
    local_rank: int
    """Index of this process among those on its node (selects the GPU)."""
    local_world_size: int
    """Number of training processes on this node."""
    master_addr: str
    """Host of rank 0's rendezvous store ("" when MPI must still agree on it)."""
    master_port: int
    """TCP port of the rendezvous store (0 when not known yet)."""
    launcher: str
    """Which launcher started us: "torchrun", "slurm", "mpi" or "single"."""

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")


# ----------------------------------------------------------------------------- helpers


def _get_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], names: tuple[str, ...], minimum: int = 0) -> Optional[tuple[str, int]]:
    """The first of ``names`` present in ``env``, parsed; None when none is present."""
    for name in names:
        if name in env and env[name].strip() != "":
            return name, _get_int(env, name, minimum)
    return None


def _require_int(env: Mapping[str, str], names: tuple[str, ...], launcher: str, minimum: int = 0) -> tuple[str, int]:
    found = _first_int(env, names, minimum)
    if found is None:
        raise ValueError(
            f"{launcher} launch detected but {' / '.join(names)} is not set; "
            f"variables present: {sorted(k for k in env if k in _ALL_KNOWN)}"
        )
    return found


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM hostlist syntax: ``"n[1-3,5],gpu[08-09]-ib"`` -> n1 n2 n3 n5 gpu08-ib gpu09-ib.

    Zero padding of a range's first bound is kept; several bracket groups in one name
    expand as a cartesian product, as ``scontrol show hostnames`` does.
    """
    if not isinstance(hostlist, str) or not hostlist.strip():
        raise ValueError(f"hostlist={hostlist!r} is empty")
    # Split on commas outside brackets.
    names, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist={hostlist!r} has an unmatched ']'")
        elif ch == "," and depth == 0:
            names.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist={hostlist!r} has an unmatched '['")
    names.append(hostlist[start:])
    hosts: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            raise ValueError(f"hostlist={hostlist!r} has an empty host name")
        hosts.extend(_expand_one(name, hostlist))
    return hosts


def _expand_one(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, suffix = name[: match.start()], name[match.end():]
    out: list[str] = []
    for part in match.group(1).split(","):
        part = part.strip()
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi = int(bounds[0]), int(bounds[1])
            if hi < lo:
                raise ValueError(f"hostlist={whole!r}: range {part!r} is decreasing")
            width = len(bounds[0])
            values = [str(v).zfill(width) for v in range(lo, hi + 1)]
        else:
            raise ValueError(f"hostlist={whole!r}: bad range {part!r}")
        for value in values:
            out.extend(_expand_one(prefix + value + suffix, whole))
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed task counts: ``"2(x3),1"`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not of the form '2(x3),1'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
        "PMIX_RANK")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NODEID",
          "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_NODELIST",
          "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_STEP_ID")
_ALL_KNOWN = frozenset(_TORCHRUN + _MPI + _SLURM)


def _master(env: Mapping[str, str], required: bool, launcher: str) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR", "").strip()
    port = _first_int(env, ("MASTER_PORT",), minimum=1)
    if port is not None and port[1] > 65535:
        raise ValueError(f"MASTER_PORT={env['MASTER_PORT']!r} must be <= 65535")
    if required and not addr:
        raise ValueError(f"{launcher} launch with world size > 1 needs MASTER_ADDR, which is not set")
    if required and port is None:
        raise ValueError(f"{launcher} launch with world size > 1 needs MASTER_PORT, which is not set")
    return addr, (port[1] if port else 0)


def _checked(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str],
             addr: str, port: int, launcher: str) -> RankInfo:
    n_rank, n_world, n_local, n_local_world = names
    if world < 1:
        raise ValueError(f"{n_world}={world} must be >= 1")
    if rank >= world:
        raise ValueError(f"{n_rank}={rank} must be smaller than {n_world}={world}")
    if local_world < 1 or local_world > world:
        raise ValueError(f"{n_local_world}={local_world} must be between 1 and {n_world}={world}")
    if local_rank >= local_world:
        raise ValueError(f"{n_local}={local_rank} must be smaller than {n_local_world}={local_world}")
    return RankInfo(rank, world, local_rank, local_world, addr, port, launcher)


# --------------------------------------------------------------------------- discovery


def _from_torchrun(env: Mapping[str, str]) -> RankInfo:
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise ValueError(f"{other} is set but {name} is not; an env:// launch needs both")
    rank = _get_int(env, "RANK")
    world = _get_int(env, "WORLD_SIZE", minimum=1)
    local = _first_int(env, ("LOCAL_RANK",))
    local_world = _first_int(env, ("LOCAL_WORLD_SIZE",), minimum=1)
    # Hand-written env:// launches often set only RANK/WORLD_SIZE: read that as one
    # process per node. A LOCAL_RANK without LOCAL_WORLD_SIZE leaves the node's share
    # unknown, and the whole world is the only safe upper bound.
    local_rank = local[1] if local else 0
    if local_world:
        local_world_size = local_world[1]
    else:
        local_world_size = world if local else 1
    addr, port = _master(env, required=world > 1, launcher="torchrun")
    return _checked(rank, world, local_rank, local_world_size,
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                    addr or "127.0.0.1", port, "torchrun")


def _from_mpi(env: Mapping[str, str]) -> RankInfo:
    if "OMPI_COMM_WORLD_RANK" in env:
        n_rank, rank = _require_int(env, ("OMPI_COMM_WORLD_RANK",), "Open MPI")
        n_world, world = _require_int(env, ("OMPI_COMM_WORLD_SIZE",), "Open MPI", minimum=1)
        local = _first_int(env, ("OMPI_COMM_WORLD_LOCAL_RANK",))
        local_world = _first_int(env, ("OMPI_COMM_WORLD_LOCAL_SIZE",), minimum=1)
    else:
        n_rank, rank = _require_int(env, ("PMI_RANK", "PMIX_RANK"), "MPI")
        n_world, world = _require_int(env, ("PMI_SIZE",), "MPI", minimum=1)
        local = _first_int(env, ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"))
        local_world = _first_int(env, ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"), minimum=1)
    if local is None:
        raise ValueError(f"MPI launch detected ({n_rank}={rank}) but no local rank variable "
                         "(OMPI_COMM_WORLD_LOCAL_RANK / MPI_LOCALRANKID / PMI_LOCAL_RANK) is set")
    n_local, local_rank = local
    n_local_world, local_world_size = local_world if local_world else ("local size", world)
    # MASTER_ADDR/PORT are optional here: init_distributed agrees on them with mpi4py.
    addr, port = _master(env, required=False, launcher="MPI")
    return _checked(rank, world, local_rank, local_world_size,
                    (n_rank, n_world, n_local, n_local_world), addr, port, "mpi")


def _from_slurm(env: Mapping[str, str]) -> RankInfo:
    n_rank, rank = _require_int(env, ("SLURM_PROCID",), "SLURM")
    # The step's task count is what srun started; SLURM_NTASKS is the job's (same for
    # a plain `srun` in an sbatch script, different for a step on part of the job).
    n_world, world = _require_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
                                  "SLURM", minimum=1)
    n_local, local_rank = _require_int(env, ("SLURM_LOCALID",), "SLURM")
    n_local_world, local_world_size = "SLURM tasks on this node", 1
    spec_name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(n)), None)
    if spec_name is not None:
        counts = parse_tasks_per_node(env[spec_name])
        node = _first_int(env, ("SLURM_NODEID",))
        node_id = node[1] if node else 0
        if node_id >= len(counts):
            raise ValueError(f"SLURM_NODEID={node_id} is outside {spec_name}={env[spec_name]!r}")
        n_local_world, local_world_size = spec_name, counts[node_id]
    else:
        local_world_size = max(local_rank + 1, 1)
    addr, port = _master(env, required=False, launcher="SLURM")
    if not addr:
        nodelist_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                              if env.get(n)), None)
        if nodelist_name is None:
            if world > 1:
                raise ValueError("SLURM launch with world size > 1 needs SLURM_STEP_NODELIST or "
                                 "SLURM_JOB_NODELIST (or MASTER_ADDR) to find rank 0's host")
            addr = "127.0.0.1"
        else:
            addr = expand_hostlist(env[nodelist_name])[0]
    if not port:
        job = _first_int(env, ("SLURM_JOB_ID", "SLURM_JOBID"))
        step = _first_int(env, ("SLURM_STEP_ID", "SLURM_STEPID"))
        # Same on every task of the step without any communication; differs between
        # consecutive steps so a lingering store of the previous step cannot collide.
        seed = (job[1] if job else 0) * 7 + (step[1] if step else 0)
        port = _SLURM_PORT_BASE + seed % _SLURM_PORT_SPAN
    return _checked(rank, world, local_rank, local_world_size,
                    (n_rank, n_world, n_local, n_local_world), addr, port, "slurm")


def discover_rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """This process's place in the job, read from ``environ`` (default ``os.environ``).

    Raises ``ValueError`` naming the variable and its value when a launcher's variables
    are missing, not integers, or inconsistent (e.g. rank >= world size).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if any(name in env for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        return _from_mpi(env)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env
                                  or "SLURM_STEP_NUM_TASKS" in env):
        return _from_slurm(env)
    # Anything else, including an sbatch batch script not under srun (SLURM_PROCID set
    # but no step variables): one process, whatever --ntasks says, rather than a hang
    # waiting for tasks that were never started.
    addr, port = _master(env, required=False, launcher="single")
    return RankInfo(0, 1, 0, 1, addr or "127.0.0.1", port, "single")


# ------------------------------------------------------------------------------ start-up


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _agree_with_mpi(info: RankInfo) -> RankInfo:
    """Rank 0 picks its host name and a free port; every rank gets them by MPI bcast."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 - only MPI launches need it
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ValueError(
            "MPI launch without MASTER_ADDR needs mpi4py (pip install 'expert_parallel[mpi]') "
            "or MASTER_ADDR/MASTER_PORT exported by the job script"
        ) from exc
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise ValueError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment says "
            f"rank {info.rank} of {info.world_size}"
        )
    mine = None
    if info.rank == 0:
        # The host name, not an address: on multi-homed nodes it is what the cluster's
        # resolver maps to the interface the other nodes reach.
        mine = (info.master_addr or socket.gethostname(), info.master_port or _free_port())
    addr, port = comm.bcast(mine, root=0)
    return RankInfo(info.rank, info.world_size, info.local_rank, info.local_world_size,
                    addr, int(port), info.launcher)


def export_env(info: RankInfo) -> None:
    """Publish ``info`` as the ``env://`` variables torch (and user code) reads."""
    os.environ.update({
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    })


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> RankInfo:
    """Discover this rank and initialise the default process group.

    A world of one with no launcher initialises nothing (plain ``python train.py``).
    Calling it again after a successful initialisation returns the same info.
    """
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {timeout!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    info = discover_rank_info(os.environ)
    if info.launcher == "mpi" and (not info.master_addr or not info.master_port):
        info = _agree_with_mpi(info)
    if info.launcher == "single" and info.world_size == 1:
        return info
    if info.launcher == "single":  # pragma: no cover - discovery never returns this
        raise ValueError(f"world_size={info.world_size} without a launcher")
    if not info.master_port:
        info = RankInfo(info.rank, info.world_size, info.local_rank, info.local_world_size,
                        info.master_addr, _free_port(), info.launcher)
    export_env(info)
    if dist.is_initialized():
        return info
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if info.launcher == "torchrun" and restart is not None:
        # torchrun keeps ONE store for every restart round of an elastic job. Without a
        # per-round prefix, a restarted rank can read the address a dead peer published
        # in the previous round and fail with "connectFullMesh ... Connection refused".
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                              is_master=not agent_store and info.rank == 0, timeout=timeout,
                              multi_tenant=True)
        dist.init_process_group(backend=backend or default_backend(),
                                store=dist.PrefixStore(f"restart_{restart}", store),
                                rank=info.rank, world_size=info.world_size, timeout=timeout)
        return info
    dist.init_process_group(backend=backend or default_backend(), init_method="env://",
                            rank=info.rank, world_size=info.world_size, timeout=timeout)
    return info


def shutdown() -> None:
    """Destroy the default process group if one is initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["RankInfo", "discover_rank_info", "expand_hostlist", "parse_tasks_per_node",
           "export_env", "init_distributed", "shutdown"]
