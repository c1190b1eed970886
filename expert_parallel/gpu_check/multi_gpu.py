"""Check 4: several GPUs under torchrun with NCCL.

With N >= 2 GPUs (``torch.cuda.device_count()``):

1. the golden check (what ``tests/distributed/test_ep_equivalence.py`` asserts on gloo)
   at EP=2 and, with 4 GPUs, EP=4: this module's :func:`worker` runs under
   ``torchrun --nproc_per_node=N``, every rank runs each scenario -- flat, overlap,
   hierarchical (two emulated nodes), static shapes; dropless and with drops -- and an
   EP=1 reference of the same layer on every EP rank's batch on its own GPU; outputs,
   input and router gradients must match its own batch's reference, each expert's
   gradient the sum of the references over its EP group (fp32, TF32 off);
2. the launcher for 20 steps in bf16 (``launch/train.py --dtype bf16``), whose
   ``summary.json`` must report 20 steps, bf16 and a finite loss.

With fewer than 2 GPUs the result is "multi-GPU: not run, 1 GPU" -- never a pass. A dry
run runs the same driver on 2 CPU processes over gloo (launcher: 2 steps, fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import MoEConfig
from ..distributed.device import default_backend, local_device
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from .common import REPO, Context, rel_err, result, step

TOLERANCE = 1e-5
TOKENS = [13, 7, 20, 9]
STATIC_TOKENS = 12
SCENARIO_MODES: dict[str, dict] = {
    "flat": {},
    "overlap": {"overlap_chunks": 2},
    "hierarchical": {"a2a_algorithm": "hierarchical"},
    "static": {"static_shapes": True, "nonfinite_policy": "count"},
}


def _scenarios() -> list[tuple[str, str, MoEConfig]]:
    out = []
    for mode, overrides in SCENARIO_MODES.items():
        for cap in (None, 1.0):
            if cap is None and mode == "static":
                continue  # the padded exchange needs a capacity
            cfg = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=2, capacity_factor=cap,
                            eval_capacity_factor=cap, min_capacity=1, aux_loss_coeff=0.01,
                            z_loss_coeff=0.001, init_std=0.1, **overrides)
            out.append((mode, "dropless" if cap is None else "capacity_1.0", cfg))
    return out


def _batch(rank: int, cfg: MoEConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = STATIC_TOKENS if cfg.static_shapes else TOKENS[rank % len(TOKENS)]
    gen = torch.Generator().manual_seed(1000 + rank)
    return (torch.randn(tokens, cfg.hidden_size, generator=gen).to(device),
            torch.randn(tokens, cfg.hidden_size, generator=gen).to(device))


def golden(ep: int, device: torch.device) -> list[dict]:
    """Every scenario on this rank vs the EP=1 reference (collective: all ranks call it)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rank = dist.get_rank()
    flat_groups = ParallelGroups.build(ep)
    node_groups = ParallelGroups.build(ep, ranks_per_node=max(ep // 2, 1))  # two emulated nodes
    rows = []
    for mode, cap, cfg in _scenarios():
        groups = node_groups if mode == "hierarchical" else flat_groups
        layer = MoELayer(cfg, groups, seed=7).to(device)
        got = step(layer, *_batch(rank, cfg, device))
        ref_layer = MoELayer(cfg, None, seed=7).to(device)
        refs = {r: step(ref_layer, *_batch(r, cfg, device)) for r in groups.ep_ranks}
        mine = refs[rank]
        errs = {"output": rel_err(got["output"], mine["output"]), "x_grad": rel_err(got["x_grad"], mine["x_grad"]),
                "router.weight": rel_err(got["grads"]["router.weight"], mine["grads"]["router.weight"])}
        ids = layer.experts.expert_ids
        for name, grad in got["grads"].items():
            if name.startswith("experts."):
                want = sum(refs[r]["grads"][name][ids[0] : ids[-1] + 1] for r in groups.ep_ranks)
                errs[name] = rel_err(grad, want)
        counts_ok = torch.equal(got["kept"], mine["kept"]) and torch.equal(got["routed"], mine["routed"])
        worst = max(errs.values())
        rows.append({"mode": mode, "capacity": cap, "dispatcher": layer.dispatcher.describe(), "rank": rank,
                     "max_rel_err": worst, "counts_equal": counts_ok,
                     "status": "pass" if counts_ok and worst <= TOLERANCE else "fail"})
    return rows


def worker(argv: Optional[list[str]] = None) -> None:
    """``torchrun ... -m expert_parallel.gpu_check.multi_gpu --ep N --out FILE``."""
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = local_device()
    dist.init_process_group(default_backend())
    try:
        rows = golden(a.ep, device)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() == 0:
            with open(a.out, "w") as fh:
                json.dump({"backend": dist.get_backend(), "device": str(device),
                           "rows": [r for part in gathered for r in part]}, fh, indent=1)
    finally:
        dist.destroy_process_group()


def _torchrun(nproc: int, args: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-3000:]


def run_golden(nproc: int, env: dict, work: Path) -> dict:
    out = work / f"golden_ep{nproc}.json"
    proc = _torchrun(nproc, ["-m", "expert_parallel.gpu_check.multi_gpu", "--ep", str(nproc), "--out", str(out)],
                     600, env)
    if proc.returncode != 0 or not out.exists():
        return {"ep": nproc, "status": "fail", "detail": f"torchrun exit {proc.returncode}", "log_tail": _tail(proc)}
    data = json.loads(out.read_text())
    bad = [r for r in data["rows"] if r["status"] != "pass"]
    worst = max(r["max_rel_err"] for r in data["rows"])
    return {"ep": nproc, "status": "fail" if bad else "pass", "backend": data["backend"],
            "scenarios": len(data["rows"]) // nproc, "max_rel_err": worst, "tolerance": TOLERANCE,
            "failures": bad[:20]}


DRY_RUN_MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32", "--num-experts", "4",
                 "--expert-ffn-hidden", "48", "--global-batch-size", "8", "--eval-batches", "1"]
"""The launcher's model in a dry run (CPU): the smallest real MoE transformer."""


def run_launcher(nproc: int, steps: int, env: dict, work: Path, bf16: bool, extra: list[str]) -> dict:
    out = work / f"train_ep{nproc}"
    help_text = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120).stdout
    args = [str(REPO / "launch" / "train.py"), "--ep-size", str(nproc), "--max-steps", str(steps),
            "--out", str(out), "--eval-every", str(steps), "--ckpt-every", str(steps), *extra]
    if "--dtype" in help_text:
        args += ["--dtype", "bf16" if bf16 else "fp32"]
    proc = _torchrun(nproc, args, 600, env)
    summary_path = out / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        return {"ep": nproc, "status": "fail", "detail": f"launcher exit {proc.returncode}", "log_tail": _tail(proc)}
    summary = json.loads(summary_path.read_text())
    precision = (summary.get("precision") or {}).get("dtype")
    loss = summary.get("final_train_loss")
    problems = []
    if summary.get("steps") != steps:
        problems.append(f"steps={summary.get('steps')} (want {steps})")
    if bf16 and precision != "bf16":
        problems.append(f"precision={precision!r} (want bf16)")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        problems.append(f"final_train_loss={loss!r}")
    return {"ep": nproc, "status": "fail" if problems else "pass", "steps": summary.get("steps"),
            "precision": precision, "final_train_loss": loss, "tokens_per_s": summary.get("tokens_per_s"),
            "dispatcher": summary.get("dispatcher"), "problems": problems}


def run(ctx: Context) -> dict:
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    if ctx.cuda and gpus < 2:
        return result("not run", f"multi-GPU: not run, {gpus} GPU", gpus=gpus)
    env = {**os.environ}
    if ctx.dry_run:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    sizes = [2] if ctx.dry_run else [n for n in (2, 4) if n <= gpus]
    steps = 2 if ctx.dry_run else 20
    parts: dict[str, Any] = {"gpus": gpus, "golden": [], "launcher": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_multi_") as tmp:
        for n in sizes:
            parts["golden"].append(run_golden(n, env, Path(tmp)))
        parts["launcher"].append(run_launcher(max(sizes), steps, env, Path(tmp), bf16=not ctx.dry_run,
                                              extra=DRY_RUN_MODEL if ctx.dry_run else []))
    if not ctx.dry_run and gpus < 4:
        parts["golden"].append({"ep": 4, "status": "not run", "detail": f"EP=4: not run, {gpus} GPUs"})
    ran = [p for p in parts["golden"] + parts["launcher"] if p["status"] != "not run"]
    failed = [p for p in ran if p["status"] != "pass"]
    where = "2 CPU processes over gloo (dry run)" if ctx.dry_run else f"{gpus} GPUs over NCCL"
    summary = (f"{where}: golden check at EP={','.join(str(p['ep']) for p in parts['golden'] if p['status'] != 'not run')} "
               f"{'FAILED' if any(p['status'] == 'fail' for p in parts['golden']) else 'passed'}, launcher "
               f"{steps} steps {'FAILED' if parts['launcher'][0]['status'] == 'fail' else 'passed'}"
               + ("; EP=4: not run" if not ctx.dry_run and gpus < 4 else ""))
    return result("fail" if failed else "pass", summary, **parts)


if __name__ == "__main__":
    worker()
