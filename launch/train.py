"""Train the MoE language model with expert + data parallelism.

Examples (run from the repository root)::

    # the default: tiny MoE transformer on the built-in Python-stdlib corpus, 2 ranks
    torchrun --nproc_per_node=2 launch/train.py --out runs/default

    # 8 ranks, experts sharded 4 ways (EP=4 x expert-DP=2), 500 steps
    torchrun --nproc_per_node=8 launch/train.py --ep-size 4 --max-steps 500

    # a JSON config plus overrides; resume from the latest checkpoint in --out
    torchrun --nproc_per_node=4 launch/train.py --config launch/configs/tiny.json \
        --capacity-factor none --out runs/dropless --resume

    # one process, no launcher; or under Open MPI / SLURM srun (ranks discovered)
    python launch/train.py --max-steps 50
    mpirun -np 4 python launch/train.py --ep-size 2

Options are the fields of ``expert_parallel.training.config.TrainConfig``
(``--max-steps N``, ``--out DIR``, ``--ep-size K``, ``--data PATH``, ...).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from expert_parallel.distributed.device import local_device  # noqa: E402
from expert_parallel.distributed.groups import ParallelGroups  # noqa: E402
from expert_parallel.distributed.launch_env import init_distributed, shutdown  # noqa: E402
from expert_parallel.training.config import parse_args  # noqa: E402
from expert_parallel.training.host_memory import select_allocator  # noqa: E402
from expert_parallel.training.trainer import default_timeout, run  # noqa: E402


@record
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)  # bad options fail before any rendezvous
    if argv is None:
        # May re-execute this process with jemalloc preloaded (same PID, argv and env):
        # glibc's heap fragments over long runs (expert_parallel/training/host_memory.py).
        select_allocator(cfg.host_allocator)
    try:
        info = init_distributed(timeout=default_timeout(cfg))
        if not torch.cuda.is_available():
            # After discovery: mpirun / srun-direct set no LOCAL_WORLD_SIZE beforehand, and
            # oversubscribed intra-op threads slow 4 ranks on 2 cores ~40x.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        groups = ParallelGroups.build(cfg.ep_size, timeout=default_timeout(cfg))
        run(cfg, groups, local_device(info.local_rank))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
