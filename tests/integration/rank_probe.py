"""Rank probe run under a real launcher (mpirun, srun): where am I, which groups am I in?

    mpirun -np 4 python tests/integration/rank_probe.py OUT_DIR EP_SIZE

Each rank calls ``init_distributed``, builds ``ParallelGroups``, checks the groups with
two all-reduces and writes ``OUT_DIR/rank_<r>.json``; the test reads those files.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from expert_parallel.distributed.groups import ParallelGroups  # noqa: E402
from expert_parallel.distributed.launch_env import init_distributed, shutdown  # noqa: E402


def main() -> None:
    out, ep_size = sys.argv[1], int(sys.argv[2])
    try:
        info = init_distributed(timeout=timedelta(seconds=60))
        groups = ParallelGroups.build(ep_size, timeout=timedelta(seconds=60))
        # Sum of (rank + 1) over the world, and of global ranks over the EP group: both
        # known in closed form, so a wrong group shows up as a wrong number.
        world_sum = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(world_sum, group=groups.dp_group)
        ep_sum = torch.tensor([float(info.rank)])
        dist.all_reduce(ep_sum, group=groups.ep_group)
        record = {
            "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
            "local_world_size": info.local_world_size, "launcher": info.launcher,
            "master_addr": info.master_addr, "master_port": info.master_port,
            "hostname": socket.gethostname(), "dist_rank": dist.get_rank(),
            "ep_rank": groups.ep_rank, "ep_ranks": list(groups.ep_ranks),
            "edp_ranks": list(groups.edp_ranks), "world_sum": world_sum.item(), "ep_sum": ep_sum.item(),
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
        }
        with open(os.path.join(out, f"rank_{info.rank}.json"), "w") as fh:
            json.dump(record, fh)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
