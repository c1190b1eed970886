"""``python -m expert_parallel.gpu_check``: run the checks, write the report, exit.

The parent process never touches CUDA beyond ``torch.cuda.is_available()`` and the
environment record; each check runs in a child (``--child NAME``) with its own time
limit, so a device-side assert, a hang or an OOM in one check is recorded as that
check's error and the others still run. A child writes its result as JSON; one that
died leaves its last partial result (if it saved one) and the tail of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

NO_CUDA_EXIT = 77
"""Exit code without a CUDA device (automake's "skipped"): never mistaken for a pass."""

CHECKS: dict[str, tuple[str, float]] = {
    # name -> (title, time limit in seconds on a GPU: limits, not estimates; on one GPU
    # (multi_gpu not run) they add up to 7 minutes)
    "correctness": ("1. Correctness on one GPU (fp32 vs CPU fp64, bf16 autocast)", 150.0),
    "host_syncs": ("2. Host-sync audit (sync debug mode 'error')", 60.0),
    "cuda_graphs": ("3. CUDA graphs (static-shape forward+backward)", 45.0),
    "multi_gpu": ("4. Multi-GPU (torchrun + NCCL)", 150.0),
    "profiler": ("5. Profiler with CUDA events", 45.0),
    "speed": ("6. Speed on the GPU", 120.0),
}
DRY_RUN_LIMIT_S = 600.0  # CPU at tiny sizes, on a shared 2-core machine


def _check_fn(name: str) -> Callable[[Any], dict]:
    from . import correctness, graphs, multi_gpu, profiler_check, speed, syncs

    return {"correctness": correctness.run, "host_syncs": syncs.run, "cuda_graphs": graphs.run,
            "multi_gpu": multi_gpu.run, "profiler": profiler_check.run, "speed": speed.run}[name]


def run_child(name: str, result_path: str, dry_run: bool) -> int:
    """Run one check in this process and write its result (always, also on error)."""
    from .common import make_context, result

    started = time.perf_counter()
    try:
        res = _check_fn(name)(make_context(dry_run, result_path))
    except Exception as err:  # noqa: BLE001 - the error is the result
        res = result("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                     traceback=traceback.format_exc()[-4000:])
    res["wall_s"] = round(time.perf_counter() - started, 2)
    Path(result_path).write_text(json.dumps(res, indent=1, default=str))
    return 0


def run_parent(names: list[str], dry_run: bool, limit_scale: float) -> dict[str, dict]:
    results: dict[str, dict] = {}
    env = {**os.environ}
    env["DS_ACCELERATOR"] = "cpu" if dry_run else "cuda"  # before any deepspeed import
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in names:
            title, limit = CHECKS[name]
            limit = (DRY_RUN_LIMIT_S if dry_run else limit) * limit_scale
            path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "expert_parallel.gpu_check", "--child", name, "--result", str(path)]
            cmd += ["--dry-run-cpu"] if dry_run else []
            print(f"[gpu_check] {title} ...", flush=True)
            started = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            except subprocess.TimeoutExpired as err:
                rc, tail = None, ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                                  else (err.stdout or ""))[-3000:]
            if path.exists():  # final, or the partial result of a child that died
                res = json.loads(path.read_text())
                if rc != 0:
                    res.update(status="error", log_tail=tail,
                               summary=f"{'timed out' if rc is None else f'died (exit {rc})'}; "
                                       f"partial: {res['summary']}")
            elif rc is None:
                res = {"status": "error", "summary": f"timed out after {limit:.0f} s", "log_tail": tail}
            else:
                res = {"status": "error", "summary": f"the check process died (exit {rc})", "log_tail": tail}
            res.setdefault("wall_s", round(time.perf_counter() - started, 2))
            res["title"] = title
            results[name] = res
            print(f"[gpu_check]   {res['status']}: {res['summary']}", flush=True)
    return results


def default_out(dry_run: bool) -> Path:
    from .common import REPO

    if dry_run:
        return REPO / "runs" / "gpu_check_dry_run" / "gpu_check.json"
    return REPO / "benchmarks" / "results" / "gpu_check.json"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run every check's code on the CPU at tiny sizes (no CUDA needed)")
    p.add_argument("--only", default=",".join(CHECKS),
                   help=f"comma-separated checks to run (default: all): {','.join(CHECKS)}")
    p.add_argument("--out", default=None, help="report JSON path (the .md goes beside it); default "
                   "benchmarks/results/gpu_check.json, runs/gpu_check_dry_run/ for a dry run")
    p.add_argument("--time-limit-scale", type=float, default=1.0, help="multiply every check's time limit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        return run_child(a.child, a.result, a.dry_run_cpu)
    if not a.dry_run_cpu and not torch.cuda.is_available():
        print("no CUDA device", flush=True)
        return NO_CUDA_EXIT
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        p.error(f"--only: unknown check(s) {unknown}; choose from {','.join(CHECKS)}")
    from .common import environment
    from .report import overall_status, write_report

    started = time.perf_counter()
    results = run_parent(names, a.dry_run_cpu, a.time_limit_scale)
    out = Path(a.out) if a.out else default_out(a.dry_run_cpu)
    report = {"benchmark": "gpu_check", "dry_run": a.dry_run_cpu, **environment(),
              "wall_s": round(time.perf_counter() - started, 1), "checks": results}
    report["command"] = " ".join(["scripts/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    report["status"] = overall_status(results)
    write_report(out, report)
    print(f"[gpu_check] {report['status']}: {out} and {out.with_suffix('.md')} ({report['wall_s']:.0f} s)",
          flush=True)
    return 0 if report["status"] == "pass" else 1


__all__ = ["CHECKS", "NO_CUDA_EXIT", "main", "run_child", "run_parent"]
