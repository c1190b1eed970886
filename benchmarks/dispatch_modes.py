"""Dispatch modes side by side: flat vs overlapped vs hierarchical vs static-shape.

Question: on a given cluster (or the emulated two-node one with a rate-limited link),
how much does each dispatch mode change the time of one MoE layer (forward+backward)?
All modes compute the same result (the distributed tests check that); this measures
only speed. Every rank holds the same number of tokens; EP spans the whole world.

Run under any launcher the project supports, e.g.::

    torchrun --nproc_per_node=4 benchmarks/dispatch_modes.py --ranks-per-node 2
    # on the emulated cluster (scripts/cluster): srun -N2 --ntasks-per-node=2 ...

Rank 0 writes ``--out`` (JSON) plus a markdown table and a PNG next to it. The layer
time of a mode is the median over iterations of the slowest rank's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from expert_parallel import MoEConfig, MoELayer, ParallelGroups  # noqa: E402
from expert_parallel.distributed.launch_env import init_distributed, shutdown  # noqa: E402


def _modes(overlap_chunks: list[int], hierarchical: bool) -> dict[str, dict]:
    modes: dict[str, dict] = {"flat": {}}
    for n in overlap_chunks:
        modes[f"overlap{n}"] = {"overlap_chunks": n}
    if hierarchical:
        modes["hierarchical"] = {"a2a_algorithm": "hierarchical"}
    modes["static_shapes"] = {"static_shapes": True}
    return modes


def time_mode(layer: MoELayer, x: torch.Tensor, iters: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        out = layer(x)
        (out.output.float().square().mean() + out.aux_loss).backward()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(elapsed))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--ranks-per-node", type=int, default=0,
                   help="ranks per node for the hierarchical mode (0 = LOCAL_WORLD_SIZE)")
    p.add_argument("--overlap-chunks", type=int, nargs="*", default=[2, 4])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="", help="free text recorded with the result (e.g. link rate)")
    p.add_argument("--out", default="benchmarks/results/dispatch_modes.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = init_distributed()
    try:
        world = dist.get_world_size()
        rpn = args.ranks_per_node or info.local_world_size
        hierarchical = 1 < rpn < world and world % rpn == 0
        groups = ParallelGroups.build(world, ranks_per_node=rpn if hierarchical else 0)
        base = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
                         top_k=args.top_k, capacity_factor=args.capacity_factor,
                         eval_capacity_factor=args.capacity_factor, activation="gelu")
        x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(dist.get_rank()))
        results = {}
        for name, overrides in _modes(args.overlap_chunks, hierarchical).items():
            layer = MoELayer(base.replace(**overrides), groups, seed=0)
            times = time_mode(layer, x, args.iters, args.warmup)
            results[name] = {"median_s": statistics.median(times), "times_s": times}
        flat = results["flat"]["median_s"]
        for r in results.values():
            r["ratio_vs_flat"] = r["median_s"] / flat
        if dist.get_rank() == 0:
            report = {
                "benchmark": "dispatch_modes", "label": args.label,
                "command": " ".join([sys.executable, *sys.argv]),
                "config": {**vars(args), "world_size": world, "ranks_per_node": rpn,
                           "launcher": info.launcher},
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                             "hostname": platform.node()},
                "results": results,
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
            md = [f"# Dispatch modes ({world} ranks, {rpn} per node) {args.label}", "",
                  "| mode | median layer fwd+bwd (s) | ratio vs flat |", "|---|---|---|"]
            md += [f"| {n} | {r['median_s']:.4f} | {r['ratio_vs_flat']:.3f} |" for n, r in results.items()]
            with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
                fh.write("\n".join(md) + "\n")
            print("\n".join(md), flush=True)
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(6, 3.5))
                ax.bar(list(results), [r["median_s"] for r in results.values()])
                ax.set(ylabel="layer fwd+bwd (s)", title=f"dispatch modes {args.label}")
                fig.tight_layout()
                fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=90)
                plt.close(fig)
            except ImportError:
                pass
    finally:
        shutdown()


if __name__ == "__main__":
    main()
