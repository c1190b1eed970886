"""Dispatch modes side by side: flat vs overlapped vs hierarchical vs static-shape.

Question: on a given cluster (or the emulated two-node one with a rate-limited link),
how much does each dispatch mode change the time of one MoE layer (forward+backward)?
All modes compute the same result (the distributed tests check that); this measures
only speed. Every rank holds the same number of tokens; EP spans the whole world.

Run under any launcher the project supports, e.g.::

    torchrun --nproc_per_node=4 benchmarks/dispatch_modes.py --ranks-per-node 2
    # on the emulated cluster (scripts/cluster): srun -N2 --ntasks-per-node=2 ...

Rank 0 writes ``--out`` (JSON) plus a markdown table and a PNG next to it. The layer
time of a mode is the median over iterations of the slowest rank's time; its exchange
time (dispatch + combine all-to-all, forward + backward, from the layer's phase timer) is
reported beside it.

With ``--ranks-per-node`` (hierarchical mode on), the script also measures the two link
kinds with raw all-to-alls (every node-local group at once, then every inter-node group
at once, so ranks share a node's link as they do in the layer) and feeds the measured
bandwidths and per-message costs, plus the measured expert load, into
``benchmarks/cluster_model.py``'s alpha-beta model: predicted vs measured exchange time
per mode is the model's check against a real (emulated) network.

On the emulated two-node cluster (``scripts/cluster/start.sh --rate 200mbit``)::

    for n in 1 2; do scripts/cluster/run.sh --node $n torchrun --nnodes 2 --node_rank $((n-1)) \
        --nproc_per_node 2 --rdzv_backend static --master_addr n1 --master_port 29555 \
        benchmarks/dispatch_modes.py --ranks-per-node 2 --label link-200mbit \
        --out benchmarks/results/dispatch_modes_2node_200mbit.json & done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._common import add_dtype_arg, precisions, timed_max  # noqa: E402
from benchmarks.cluster_model import Links, exchange_time  # noqa: E402
from expert_parallel import MoEConfig, MoELayer, ParallelGroups  # noqa: E402
from expert_parallel.distributed.launch_env import init_distributed, shutdown  # noqa: E402
from expert_parallel.profiling.timer import NULL_TIMER, PhaseTimer  # noqa: E402

EXCHANGE = ("dispatch_a2a", "combine_a2a")


def _preset_modes(preset: str, hierarchical: bool, nodes: int, topk_groups: int) -> dict[str, dict]:
    """``group_limited``: unrestricted vs node-limited routing (``num_groups`` = nodes) at
    the same k; ``shared_overlap``: a shared expert computed after the routed experts vs
    while the dispatch exchange is in flight. Flat, and hierarchical when it applies."""
    algos = {"flat": {}, **({"hierarchical": {"a2a_algorithm": "hierarchical"}} if hierarchical else {})}
    modes: dict[str, dict] = {}
    for alg, over in algos.items():
        if preset == "group_limited":
            modes[alg] = over
            modes[f"{alg}_group_limited"] = {**over, "num_groups": nodes, "topk_groups": topk_groups}
        else:
            modes[alg] = {**over, "num_shared_experts": 1, "shared_expert_overlap": False}
            modes[f"{alg}_shared_overlap"] = {**over, "num_shared_experts": 1, "shared_expert_overlap": True}
    return modes


def _modes(overlap_chunks: list[int], hierarchical: bool) -> dict[str, dict]:
    modes: dict[str, dict] = {"flat": {}}
    for n in overlap_chunks:
        modes[f"overlap{n}"] = {"overlap_chunks": n}
    if hierarchical:
        modes["hierarchical"] = {"a2a_algorithm": "hierarchical"}
    modes["static_shapes"] = {"static_shapes": True, "nonfinite_policy": "count"}
    return modes


def link_tx_bytes() -> int:
    """Bytes this network namespace has sent on every interface but loopback (Linux
    ``/proc/net/dev``, which is per network namespace: on the emulated cluster each node's
    veth link, i.e. exactly the inter-node traffic)."""
    total = 0
    with open("/proc/net/dev") as fh:
        for line in fh.read().splitlines()[2:]:
            name, counters = line.split(":", 1)
            if name.strip() != "lo":
                total += int(counters.split()[8])
    return total


def time_modes(layers: dict[str, MoELayer], x: torch.Tensor, iters: int, warmup: int,
               count_link: bool = False, dtype: str = "fp32") -> dict:
    """Per mode and iteration, the slowest rank's layer time (forward + backward), exchange
    time (dispatch + combine all-to-all, forward + backward, from the phase timer) and
    count-exchange time; plus the kept rows per expert summed over ranks and iterations
    (the measured traffic shape). Modes are interleaved iteration by iteration, so a load
    drift on a shared machine hits every mode alike."""
    prec = precisions(dtype, x.device.type)[0]
    timers = {name: PhaseTimer(x.device) for name in layers}
    for name, layer in layers.items():
        layer.set_timer(timers[name])
    res = {name: {"times_s": [], "exchange_s": [], "count_exchange_s": [], "link_bytes": [],
                  "kept_E": torch.zeros(layer.config.num_experts, dtype=torch.int64)}
           for name, layer in layers.items()}
    for i in range(warmup + iters):
        for name, layer in layers.items():
            timer = timers[name]
            dist.barrier()
            timer.collect()
            tx0 = link_tx_bytes() if count_link else 0
            t0 = time.perf_counter()
            with prec.autocast(x.device.type):
                out = layer(x)
                loss = out.output.float().square().mean() + out.aux_loss
            loss.backward()
            elapsed = time.perf_counter() - t0
            ph = timer.collect()
            a2a = sum(ph.get(p, 0.0) + ph.get(p + ".bwd", 0.0) for p in EXCHANGE)
            tx = link_tx_bytes() - tx0 if count_link else 0
            slowest = torch.tensor([elapsed, a2a, ph.get("count_exchange", 0.0), tx], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if i >= warmup:
                for key, v in zip(("times_s", "exchange_s", "count_exchange_s", "link_bytes"), slowest.tolist()):
                    res[name][key].append(v)
                res[name]["kept_E"] += out.stats.kept_E.cpu()
    for name, layer in layers.items():
        layer.set_timer(NULL_TIMER)
        dist.all_reduce(res[name]["kept_E"])
        res[name]["kept_E"] = res[name]["kept_E"].tolist()
        for key, med in (("times_s", "median_s"), ("exchange_s", "median_exchange_s"),
                         ("count_exchange_s", "median_count_exchange_s"), ("link_bytes", "median_link_bytes")):
            res[name][med] = statistics.median(res[name][key])
    return res


def probe_links(groups: ParallelGroups, nbytes: int, small: int, reps: int) -> dict:
    """Measured per-rank bandwidth (GB/s) and per-message cost (us) of the node-local and
    inter-node links: every group of a kind exchanges at once (as in the layer), median
    of ``reps`` raw all-to-alls of ``small`` and ``nbytes`` bytes per peer."""

    def run(group, size: int, peers: int) -> float:
        buf = torch.zeros(max(1, size // 4) * peers)
        out = torch.empty_like(buf)
        samples = [timed_max(lambda: dist.all_to_all_single(out, buf, group=group)) for _ in range(reps + 1)]
        return statistics.median(samples[1:])

    L = groups.ranks_per_node
    M = groups.ep_size // L
    out = {}
    for kind, group, peers in (("intra", groups.intra_group, L), ("inter", groups.inter_group, M)):
        t_small, t_big = run(group, small, peers), run(group, nbytes, peers)
        remote = max(peers - 1, 1)
        out[kind] = {"small_s": t_small, "big_s": t_big, "bytes_per_peer": nbytes,
                     "GBps": remote * (nbytes - small) / max(t_big - t_small, 1e-9) / 1e9,
                     "alpha_us": 1e6 * t_small / remote}
    return out


def predict_exchange(links: dict, rpn: int, world: int, kept_E: list[int], iters: int, top_k: int,
                     row_bytes: int) -> dict:
    """The cluster model at the measured link parameters and traffic: exchange seconds
    (dispatch + combine, forward + backward) for the flat and the hierarchical mode."""
    model_links = Links(gpus_per_node=rpn, nvlink_GBps=links["intra"]["GBps"], ib_GBps=links["inter"]["GBps"],
                        alpha_nv_us=links["intra"]["alpha_us"], alpha_ib_us=links["inter"]["alpha_us"],
                        alpha_0_us=0.0)
    total = sum(kept_E)
    e = len(kept_E) // world
    gpu_share = [sum(kept_E[g * e:(g + 1) * e]) / total for g in range(world)]
    kept_tokens = total / (iters * world * top_k)  # kept rows per rank / k
    out = {}
    for alg in ("flat", "hierarchical"):
        one = exchange_time(world, model_links, gpu_share, kept_tokens, top_k, row_bytes, alg,
                            dedup=alg == "hierarchical")
        # Four exchanges per iteration (dispatch, combine; forward and backward); L ranks per node.
        out[alg] = {"exchange_s": 4 * one["seconds"], "inter_bytes_per_rank": one["ib_bytes_per_gpu"],
                    "link_bytes_per_node_iter": 4 * rpn * one["ib_bytes_per_gpu"]}
    return {"links": asdict(model_links), "gpu_share": gpu_share, "kept_tokens_per_rank": kept_tokens,
            "modes": out}


def markdown(report: dict) -> list[str]:
    cfg, results, model = report["config"], report["results"], report["model_vs_measured"]
    md = [f"# Dispatch modes ({cfg['world_size']} ranks, {cfg['ranks_per_node']} per node) {report['label']}", "",
          f"`{report['command']}`  ",
          f"E={cfg['experts']}, top-{cfg['top_k']}, {cfg['tokens']} tokens/rank, D={cfg['hidden']}, "
          f"F={cfg['ffn']}, cf {cfg['capacity_factor']}; median of {cfg['iters']} iterations "
          f"(after {cfg['warmup']} warm-up), modes interleaved; each time is the slowest rank's.", "",
          "| mode | layer fwd+bwd (s) | ratio vs flat | exchange fwd+bwd (s) | exchange ratio | count exchange (s) "
          "| inter-node MB per node per iteration |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    link = cfg.get("count_link_bytes")
    md += [f"| {n} | {r['median_s']:.4f} | {r['ratio_vs_flat']:.3f} | {r['median_exchange_s']:.4f} | "
           f"{r['exchange_ratio_vs_flat']:.3f} | {r['median_count_exchange_s']:.4f} | "
           f"{r['median_link_bytes'] / 1e6 if link else float('nan'):.2f} |" for n, r in results.items()]
    md += ["", "Exchange = dispatch + combine all-to-all phases, forward and backward (the layer's "
           "phase timer; for the overlap modes the backward exchange is not separable and only the "
           "forward wait time counts). Inter-node MB: bytes the node sent on its non-loopback "
           "interfaces during the iteration (`--count-link-bytes`, /proc/net/dev; TCP payload + headers), "
           "the slower node's."]
    md += ["", f"## Targets (preset {cfg.get('preset', 'modes')})", ""] + targets(results, model)
    if model:
        pr = model["probe"]
        md += ["", "## Cluster model vs measurement", "",
               f"Links measured with raw all-to-alls ({pr['inter']['bytes_per_peer']} B per peer): node-local "
               f"{pr['intra']['GBps']:.3f} GB/s per rank, {pr['intra']['alpha_us']:.0f} us per message; "
               f"inter-node {pr['inter']['GBps']:.4f} GB/s per rank, {pr['inter']['alpha_us']:.0f} us per "
               f"message. Traffic: the measured kept rows per rank (max/mean "
               f"{max(model['gpu_share']) * len(model['gpu_share']):.2f}).", "",
               "| mode | predicted exchange (s) | measured (s) | predicted / measured | predicted inter-node MB "
               "per node per iteration | measured |",
               "|---|---:|---:|---:|---:|---:|"]
        for alg, m in model["modes"].items():
            measured = results[alg]["median_link_bytes"] / 1e6 if link else float("nan")
            md.append(f"| {alg} | {m['exchange_s']:.4f} | {m['measured_exchange_s']:.4f} | "
                      f"{m['predicted_over_measured']:.2f} | {m['link_bytes_per_node_iter'] / 1e6:.2f} | "
                      f"{measured:.2f} |")
    return md


def targets(results: dict, model: Optional[dict]) -> list[str]:
    """Each target of the faster-dispatch work, met or missed, and by how much."""
    out = []
    overlap = {n: r["ratio_vs_flat"] for n, r in results.items() if n.startswith("overlap")}
    if overlap:
        best = min(overlap, key=overlap.get)
        out.append(f"- overlap layer time <= 0.85x flat: {best} {overlap[best]:.3f}x -> "
                   f"{'met' if overlap[best] <= 0.85 else 'MISSED'} ("
                   + ", ".join(f"{n} {v:.3f}x" for n, v in overlap.items()) + ")")
    for alg in ("flat", "hierarchical"):
        limited = results.get(f"{alg}_group_limited")
        if limited is not None:
            base = results[alg]
            speed = base["median_s"] / limited["median_s"]
            share = (limited["median_link_bytes"] / base["median_link_bytes"]
                     if base.get("median_link_bytes") else None)
            if alg == "flat":  # one row per (token, expert) whatever the routing: no target
                out.append(f"- flat (for reference): node-limited routing saves no link bytes in the flat "
                           f"exchange, which sends a row per (token, expert) ({share if share is not None else float('nan'):.3f} "
                           f"of unrestricted); layer time {speed:.2f}x. The saving needs the de-duplicating "
                           "hierarchical exchange:")
                continue
            out.append(f"- {alg}: group-limited (topk_groups=1) layer time >= 1.3x faster than unrestricted at "
                       f"the same k: {speed:.2f}x -> {'met' if speed >= 1.3 else f'MISSED by {100 * (1.3 - speed) / 1.3:.0f}%'}"
                       f" (and {results['flat']['median_s'] / limited['median_s']:.2f}x faster than the unrestricted flat exchange)")
            if share is not None:
                out.append(f"- {alg}: group-limited inter-node bytes <= topk_groups / nodes (+ side message) of "
                           f"unrestricted: {share:.3f} of it -> {'met' if share <= 0.5 * 1.05 else 'MISSED'} "
                           "(bound 0.5, 5% allowance for the side message and TCP headers)")
        shared = results.get(f"{alg}_shared_overlap")
        if shared is not None:
            gain = results[alg]["median_s"] / shared["median_s"]
            out.append(f"- {alg}: shared expert overlapped with the dispatch exchange: {gain:.3f}x the "
                       "sequential layer time (> 1 = faster)")
    if "hierarchical" in results and "hierarchical_group_limited" not in results \
            and "hierarchical_shared_overlap" not in results:
        h = results["hierarchical"]["ratio_vs_flat"]
        out.append(f"- hierarchical faster than flat: {h:.3f}x -> {'met' if h < 1.0 else f'MISSED by {100 * (h - 1):.0f}%'}")
    if model:
        worst = max(max(m["predicted_over_measured"], 1 / m["predicted_over_measured"]) for m in model["modes"].values())
        out.append(f"- cluster model within 2x of the measured exchange time: worst factor {worst:.2f} -> "
                   f"{'met' if worst <= 2.0 else 'MISSED'}")
    return out


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = report["results"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(results)
    ax.bar(names, [r["median_s"] for r in results.values()], label="layer fwd+bwd")
    ax.bar(names, [r["median_exchange_s"] for r in results.values()], label="exchange (a2a phases)")
    model = report["model_vs_measured"]
    if model:
        for alg, m in model["modes"].items():
            ax.plot([names.index(alg)], [m["exchange_s"]], "k_", markersize=30, mew=2)
        ax.plot([], [], "k_", label="model: predicted exchange")
    ax.set(ylabel="seconds", title=f"dispatch modes {report['label']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    p.add_argument("--preset", default="modes", choices=["modes", "group_limited", "shared_overlap"],
                   help="modes: flat/overlap/hierarchical/static; group_limited: unrestricted vs "
                        "node-limited routing (num_groups = nodes); shared_overlap: a shared expert "
                        "sequential vs overlapped with the dispatch exchange")
    p.add_argument("--topk-groups", type=int, default=1, help="group_limited preset: groups per token")
    p.add_argument("--router", default="softmax_topk")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe-bytes", type=int, default=1 << 20, help="bytes per peer of the link probe")
    p.add_argument("--probe-reps", type=int, default=5)
    p.add_argument("--count-link-bytes", action="store_true",
                   help="record the bytes each node sends on its non-loopback interfaces per "
                        "iteration (/proc/net/dev; on the emulated cluster: the inter-node link)")
    add_dtype_arg(p)
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
                         eval_capacity_factor=args.capacity_factor, activation="gelu", router=args.router)
        # The input needs a gradient, as inside a transformer: then the dispatch exchange has
        # a backward too (four exchanges per iteration, not three).
        x = torch.randn(args.tokens, args.hidden,
                        generator=torch.Generator().manual_seed(dist.get_rank())).requires_grad_(True)
        modes = (_modes(args.overlap_chunks, hierarchical) if args.preset == "modes" else
                 _preset_modes(args.preset, hierarchical, world // rpn if hierarchical else 2, args.topk_groups))
        layers = {name: MoELayer(base.replace(**overrides), groups, seed=0) for name, overrides in modes.items()}
        prec_name = precisions(args.dtype)[0].name  # the rows the exchanges move: bf16 or fp32
        results = time_modes(layers, x, args.iters, args.warmup, args.count_link_bytes, args.dtype)
        flat = results["flat"]["median_s"]
        for r in results.values():
            r["ratio_vs_flat"] = r["median_s"] / flat
            r["exchange_ratio_vs_flat"] = r["median_exchange_s"] / max(results["flat"]["median_exchange_s"], 1e-12)
        model = None
        if hierarchical and args.preset == "modes":
            links = probe_links(groups, args.probe_bytes, 64, args.probe_reps)
            model = predict_exchange(links, rpn, world, results["flat"]["kept_E"], args.iters,
                                     args.top_k, args.hidden * (2 if prec_name == "bf16" else 4))
            model["probe"] = links
            for alg, pred in model["modes"].items():
                pred["measured_exchange_s"] = results[alg]["median_exchange_s"]
                pred["predicted_over_measured"] = pred["exchange_s"] / max(pred["measured_exchange_s"], 1e-12)
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
                "model_vs_measured": model,
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
            md = markdown(report)
            with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
                fh.write("\n".join(md) + "\n")
            print("\n".join(md), flush=True)
            plot(report, os.path.splitext(args.out)[0] + ".png")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
