"""Soak: does a long run leak host memory?

Question: over 2,000 steps of the default tiny MoE transformer (EP=2 on 2 gloo ranks,
checkpoints, evaluation, metrics and TensorBoard as in a real run), does each worker's
resident memory (RSS) stay flat once warmed up? The launcher runs under ``torchrun``;
this script samples every worker's ``VmRSS`` from ``/proc`` once a second and the
current step from ``OUT/metrics.jsonl``, so the training code is not touched.

The launcher's processes run on jemalloc when it is installed (``--host-allocator``,
``expert_parallel/training/host_memory.py``); ``--train-args "--host-allocator glibc"``
measures the system allocator instead.

Growth after warm-up, per rank = (mean RSS over the last 5% of steps) / (mean RSS over
the 100 steps after the warm-up) - 1; the warm-up is the first 10% of steps. Target:
< 5% on every rank. Writes ``benchmarks/results/soak.{json,md,png}``.

    nice -n 10 python benchmarks/soak.py                       # 2,000 steps, ~10 minutes
    python benchmarks/soak.py --steps 60 --out /tmp/soak       # smoke size
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the training processes below the torchrun agent ``agent``."""
    found = {}
    for path in glob.glob("/proc/[0-9]*/environ"):
        pid = int(path.split("/")[2])
        try:
            with open(path, "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
            if b"RANK" not in env or b"TORCHELASTIC_RUN_ID" not in env:
                continue
            p = pid
            while p > 1 and p != agent:
                p = _parent(p)
        except (OSError, ValueError):
            continue
        if p == agent:
            found[int(env[b"RANK"])] = pid
    return found


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class StepReader:
    """Reads the newest step from a growing metrics.jsonl without re-reading it."""

    def __init__(self, path: str) -> None:
        self.path, self.offset, self.step, self.rest = path, 0, 0, b""

    def poll(self) -> int:
        if os.path.exists(self.path):
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                blob = self.rest + fh.read()
                self.offset = fh.tell()
            *lines, self.rest = blob.split(b"\n")
            for line in lines:
                if line.strip():
                    self.step = max(self.step, json.loads(line)["step"])
        return self.step


def _window_mean(samples: list[dict], rank: str, lo: int, hi: int) -> float:
    values = [s["rss_mb"][rank] for s in samples if lo <= s["step"] <= hi and rank in s["rss_mb"]]
    if not values:
        raise RuntimeError(f"no RSS samples between steps {lo} and {hi}")
    return sum(values) / len(values)


def analyse(samples: list[dict], steps: int) -> dict:
    warmup = max(1, steps // 10)
    base_hi = min(steps, warmup + max(10, steps // 20))
    tail_lo = steps - max(10, steps // 20)
    ranks = sorted({r for s in samples for r in s["rss_mb"]})
    per_rank = {}
    for r in ranks:
        base = _window_mean(samples, r, warmup, base_hi)
        # Samples taken at the last step include the final save and process teardown
        # (RSS falls as the worker exits), which would flatter the tail; leave them out.
        tail = _window_mean(samples, r, tail_lo, steps - 1)
        peak = max(s["rss_mb"][r] for s in samples if r in s["rss_mb"])
        per_rank[r] = {"rss_after_warmup_mb": base, "rss_end_mb": tail, "peak_rss_mb": peak,
                       "growth_after_warmup": tail / base - 1.0}
    worst = max(v["growth_after_warmup"] for v in per_rank.values())
    return {"warmup_steps": warmup, "baseline_steps": [warmup, base_hi], "tail_steps": [tail_lo, steps - 1],
            "per_rank": per_rank, "max_growth_after_warmup": worst, "target": 0.05,
            "passed": worst < 0.05}


def plot(samples: list[dict], result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in sorted({r for s in samples for r in s["rss_mb"]}):
        pts = [(s["step"], s["rss_mb"][r]) for s in samples if r in s["rss_mb"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"rank {r}")
    ax.axvline(result["analysis"]["warmup_steps"], color="grey", ls="--", label="end of warm-up")
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"Soak: {result['steps']} steps, growth after warm-up "
                 f"{100 * result['analysis']['max_growth_after_warmup']:+.2f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    a = result["analysis"]
    lines = [
        "# Soak: resident memory over a long run",
        "",
        f"Command: `{result['command']}`  ",
        f"Launcher: `{' '.join(result['launcher_cmd'][2:])}`  ",
        f"{result['steps']} steps, {result['nproc']} ranks, EP={result['ep_size']}; "
        f"torch {result['versions']['torch']}, {result['hardware']['cpus']} CPUs "
        f"({result['hardware']['machine']}); wall time {result['wall_s']:.0f} s; host allocator "
        f"{result.get('host_allocator')}, {result.get('tokens_per_s') or 0:.0f} tokens/s.",
        "",
        f"Warm-up: steps 1-{a['warmup_steps']}; baseline = mean RSS over steps "
        f"{a['baseline_steps'][0]}-{a['baseline_steps'][1]}, end = mean over steps "
        f"{a['tail_steps'][0]}-{a['tail_steps'][1]}.",
        "",
        "| rank | RSS after warm-up (MiB) | RSS at end (MiB) | peak (MiB) | growth |",
        "|---|---|---|---|---|",
    ]
    for r, v in a["per_rank"].items():
        lines.append(f"| {r} | {v['rss_after_warmup_mb']:.1f} | {v['rss_end_mb']:.1f} | "
                     f"{v['peak_rss_mb']:.1f} | {100 * v['growth_after_warmup']:+.2f}% |")
    lines += ["", f"Largest growth after warm-up: **{100 * a['max_growth_after_warmup']:+.2f}%** "
              f"(target < 5%: {'met' if a['passed'] else 'NOT met'}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--out", default=RESULTS, help="directory for soak.{json,md,png}")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="the launcher's --dtype (auto = bf16 autocast where the CPU computes bf16 natively)")
    parser.add_argument("--train-args", default="",
                        help="extra launcher options, e.g. '--d-model 32 --n-layers 2'")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="soak_run_")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={_free_port()}", os.path.join(REPO, "launch", "train.py"),
           "--ep-size", str(args.ep_size), "--max-steps", str(args.steps),
           "--ckpt-every", str(max(1, args.steps // 4)), "--eval-every", str(max(1, args.steps // 10)),
           "--dtype", args.dtype, "--out", run_dir, *args.train_args.split()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    log = open(os.path.join(run_dir, "launcher.log"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    reader = StepReader(os.path.join(run_dir, "metrics.jsonl"))
    samples: list[dict] = []
    workers: dict[int, int] = {}
    while proc.poll() is None:
        if len(workers) < args.nproc:
            workers = _workers(proc.pid)
        step = reader.poll()
        rss = {str(r): kb / 1024 for r, pid in workers.items()
               if (kb := _status_kb(pid, "VmRSS")) is not None}
        if step and rss:
            samples.append({"t": round(time.monotonic() - t0, 2), "step": step, "rss_mb": rss})
        time.sleep(args.interval)
    if proc.returncode != 0:
        raise SystemExit(f"the launcher failed ({proc.returncode}); see {run_dir}/launcher.log")
    import torch

    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    result = {
        "question": "Does resident memory stay flat (< 5% growth after warm-up) over a long run?",
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "launcher_cmd": cmd, "steps": args.steps, "nproc": args.nproc, "ep_size": args.ep_size,
        "wall_s": time.monotonic() - t0, "run_dir": run_dir,
        "host_allocator": summary.get("host_allocator"), "tokens_per_s": summary.get("tokens_per_s"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "processor": platform.processor() or platform.machine()},
        "analysis": analyse(samples, args.steps),
        "samples": samples,
    }
    with open(os.path.join(args.out, "soak.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, "soak.md"), "w") as fh:
        fh.write(markdown(result))
    plot(samples, result, os.path.join(args.out, "soak.png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
