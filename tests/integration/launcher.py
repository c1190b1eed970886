"""Helpers to run the real launcher (``torchrun ... launch/train.py``) in a subprocess
and read the files it writes (never its stdout)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")

# A model small enough for 4 ranks on 2 cores, still a real MoE transformer.
TINY = [
    "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32",
    "--num-experts", "4", "--top-k", "2", "--expert-ffn-hidden", "48",
    "--global-batch-size", "8", "--eval-batches", "1", "--tensorboard", "false",
    "--collective-timeout-s", "60",
    # fp32 pinned: the launcher's default (dtype auto) is bf16 autocast on CPUs with native
    # bf16, and the golden trajectory checks compare runs at 1e-5; bf16 runs are tested on
    # purpose (test_train_bf16.py passes --dtype bf16, which overrides this).
    "--dtype", "fp32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) or key in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(key)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(nproc: int, out: Path, *args: str, timeout: float = 240, check: bool = True,
             extra_torchrun: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *extra_torchrun, TRAIN, *TINY, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def losses(out: Path) -> dict[int, float]:
    """Loss per step (the last record wins if a step was logged twice)."""
    return {r["step"]: r["loss"] for r in metrics(out)}


def summary(out: Path) -> dict:
    with open(out / "summary.json") as fh:
        return json.load(fh)


def final_checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    """All tensors of the newest checkpoint, keyed EP-independently (per global expert)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = out / "checkpoints"
    latest = (root / "latest").read_text().strip()
    target = out / "final_flat.pt"
    dcp_to_torch_save(str(root / latest), str(target))
    return torch.load(target, weights_only=True)  # plain tensors: no code runs on load
