"""The run directory (``--out``): one run per directory, never silently mixed or lost.

* A directory that holds a run (any of :data:`RUN_FILES`) is refused unless the user
  says what to do with it: ``--resume`` continues it, ``--overwrite`` deletes the run's
  files and starts a new one. The refusal happens before any rank writes anything.
* ``--resume`` from a checkpoint whose step is at or past the last step of this
  invocation (``max_steps``, or ``stop_after``) is refused too: there is nothing to train,
  and "succeeding" would report the old run's results as this one's.

The errors in :data:`AGREED_ERRORS` are raised identically on every rank (from the same
files, or from a decision rank 0 broadcast), so the launcher prints them once.
"""

from __future__ import annotations

import os
import shutil

from ..checkpoint.safe_load import UnsafeCheckpointError
from .config import TrainConfig

RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "report.png", "deepspeed_replicas.jsonl",
             "checkpoints", "tb")
"""What a run writes into its directory (files and directories). Nothing else is touched."""


class RunDirError(ValueError):
    """``--out`` holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


class ResumeError(ValueError):
    """``--resume`` found a checkpoint at or past the last step of this invocation."""


AGREED_ERRORS = (RunDirError, ResumeError, UnsafeCheckpointError)


def existing_run(out: str) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``out`` (empty checkpoint and
    TensorBoard directories do not count)."""
    found = []
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
            found.append(name + ("/" if os.path.isdir(path) else ""))
    return found


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse a second run into a directory holding one (reads only; every rank may call it)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunDirError(f"--out {cfg.out} exists and is not a directory")
    found = existing_run(cfg.out)
    if found and not (cfg.resume or cfg.overwrite):
        raise RunDirError(f"--out {cfg.out} already holds a run ({', '.join(found)}); pass --resume to "
                          "continue it or --overwrite to delete it and start over")


def clear_run(out: str) -> list[str]:
    """``--overwrite``: remove the previous run's files from ``out`` (rank 0 only)."""
    removed = existing_run(out)
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return removed


def last_step(cfg: TrainConfig) -> int:
    """The step this invocation stops at."""
    return min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps


def check_resume_step(cfg: TrainConfig, checkpoint: str, step: int) -> None:
    end = last_step(cfg)
    if step >= end:
        limit = f"--stop-after {cfg.stop_after}" if cfg.stop_after and cfg.stop_after < cfg.max_steps \
            else f"--max-steps {cfg.max_steps}"
        raise ResumeError(f"--resume: checkpoint {checkpoint} is at step {step}, at or past {limit}: "
                          "nothing to train; raise --max-steps to continue the run")


__all__ = ["RUN_FILES", "RunDirError", "ResumeError", "AGREED_ERRORS", "existing_run",
           "check_run_dir", "clear_run", "last_step", "check_resume_step"]
