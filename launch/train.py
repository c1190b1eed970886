"""Train the MoE language model with expert + data parallelism.

Examples (run from the repository root)::

    # the default: tiny MoE transformer on the built-in Python-stdlib corpus; EP = the
    # ranks per node (ep_size auto), here 8 -> experts sharded 8 ways
    torchrun --nproc_per_node=8 launch/train.py --out runs/default

    # 8 ranks, experts sharded 4 ways (EP=4 x expert-DP=2), 500 steps
    torchrun --nproc_per_node=8 launch/train.py --ep-size 4 --max-steps 500 --out runs/ep4

    # a JSON config plus overrides; continue the run in --out from its latest checkpoint
    torchrun --nproc_per_node=4 launch/train.py --config launch/configs/tiny.json \
        --capacity-factor none --out runs/dropless --resume

    # dispatch modes: hierarchical all-to-all (2 ranks per node), pipelined in 4 chunks
    torchrun --nproc_per_node=4 launch/train.py --a2a-algorithm hierarchical \
        --ranks-per-node 2 --overlap-chunks 4 --out runs/hier

    # one process, no launcher; or under Open MPI / SLURM srun (ranks discovered)
    python launch/train.py --max-steps 50 --out runs/one
    mpirun -np 4 python launch/train.py --ep-size 2

``python launch/train.py --help`` lists every option, grouped by config, with its
docstring, type and default (generated from ``expert_parallel.training.config.TrainConfig``).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from expert_parallel.distributed.device import cuda_available, local_device
from expert_parallel.distributed.groups import ParallelGroups
from expert_parallel.distributed.launch_env import discover_rank_info, init_distributed, shutdown
from expert_parallel.training.host_memory import select_allocator
from expert_parallel.training.launcher import fail, prepare
from expert_parallel.training.run_dir import AGREED_ERRORS
from expert_parallel.training.trainer import default_timeout, run

PROG = "train.py"


@record
def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        info = discover_rank_info()
    except ValueError as err:
        return fail(0, err, PROG)
    try:
        cfg = prepare(argv, info, PROG)  # bad options fail here, before any rendezvous
    except (ValueError, TypeError) as err:
        return fail(info.rank, err, PROG)
    if from_command_line:
        # May re-execute this process with jemalloc preloaded (same PID, argv and env):
        # glibc's heap fragments over long runs (expert_parallel/training/host_memory.py).
        select_allocator(cfg.host_allocator)
    try:
        info = init_distributed(timeout=default_timeout(cfg))
        if not cuda_available():
            # oversubscribed intra-op threads slow 4 ranks on 2 cores ~40x.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        # The node-local and cross-node sub-groups only for the hierarchical exchange.
        per_node = cfg.parallel.ranks_per_node if cfg.moe.a2a_algorithm == "hierarchical" else 0
        groups = ParallelGroups.build(cfg.parallel.ep_size, timeout=default_timeout(cfg),
                                      ranks_per_node=per_node)
        run(cfg, groups, local_device(info.local_rank))
    except AGREED_ERRORS as err:  # decided together (same files, or rank 0's broadcast)
        return fail(info.rank, err, PROG, named=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
