"""What an entry point does before the rendezvous, shared by ``launch/train.py`` and the
checkpoint converter: parse the options, resolve the parallel layout (``ep_size`` auto,
ranks per node from the launcher), check the run directory and the engine's own config.

All of it is a pure function of the command line, the environment and the file system,
so every rank reaches the same verdict; :func:`fail` prints a refusal once (first rank)
as one line and returns argparse's exit status 2.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..distributed.launch_env import RankInfo
from .config import TrainConfig
from .factory import check_engine_config
from .options import parse_args
from .run_dir import check_run_dir


def prepare(argv: Sequence[str], info: RankInfo, prog: str = "train.py") -> TrainConfig:
    """The run's ``TrainConfig`` with ``parallel`` resolved, or ``ValueError`` /
    ``TypeError`` (``SystemExit(2)`` for an unknown option) on every rank alike."""
    cfg = parse_args(argv, quiet=info.rank != 0, prog=prog)
    ep, per_node = cfg.parallel.resolve(cfg.moe.num_experts, info.world_size, info.local_world_size)
    cfg = cfg.with_parallel(ep, per_node)
    check_run_dir(cfg)
    check_engine_config(cfg, info.world_size)
    return cfg


def fail(rank: int, err: BaseException, prog: str = "train.py", named: bool = False) -> int:
    """Print ``err`` as one line on the first rank only (with its class name when
    ``named``); exit status 2."""
    if rank == 0:
        print(f"{prog}: error: {type(err).__name__ + ': ' if named else ''}{err}", file=sys.stderr, flush=True)
    return 2


__all__ = ["prepare", "fail"]
