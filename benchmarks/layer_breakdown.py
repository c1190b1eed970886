"""Phase breakdown of one MoE layer (forward + backward) over the design space.

Question: where does the time of one expert-parallel MoE layer go -- router, permute,
count exchange, dispatch all-to-all, experts, combine all-to-all, unpermute -- and how
does that change with capacity factor (1.0, 1.25, 2.0, dropless) x EP size (1, 2, 4) x
experts (8, 16, 64) x top-k (1, 2)? With the drop fraction of each point.

Method: for each EP size, ``EP`` gloo ranks (one intra-op thread each) build every layer
of the section, then run warm-up and ``--iters`` forward+backward iterations under
``MoEProfiler``, interleaving the layers iteration by iteration (rotating order) so that
load drift on the shared machine hits every point alike. Each rank
also times every iteration with its own wall clock; ``phase_sum_over_measured`` is, per
rank and iteration, (sum of forward phases + backward segments) and the measured time,
pooled: sum of the former over sum of the latter (other jobs on the shared cores can
steal milliseconds anywhere; pooling spreads that in proportion; the median of the
per-iteration ratios is reported beside it) -- the check that the breakdown accounts for the layer's time (the
remainder is Python glue and the loss). Layer time = slowest rank, median.

Expert scaling: ``--scaling-*`` runs E in (8, 16, 64) at fixed top-k 2, EP 2, at the
issue's target size (4096 tokens/rank, D 512, F 2048), and reports time per token
relative to E=8 (target: at most +10% at E=64).

    nice -n 10 python benchmarks/layer_breakdown.py                 # full grid + scaling
    python benchmarks/layer_breakdown.py --tiny --out /tmp/lb.json   # smoke size (tests)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._common import add_dtype_arg, environment, median, precisions, spawn, write_report  # noqa: E402
from expert_parallel.moe.experts import AUTO_BACKEND  # noqa: E402

PHASE_ORDER = ("router", "permute", "count_exchange", "dispatch_a2a", "experts", "shared_expert",
               "combine_a2a", "unpermute", "stats", "unattributed")
CF_CHOICES = {"1.0": 1.0, "1.25": 1.25, "2.0": 2.0, "dropless": None}
DESIGNS = {
    # Today's designs (issue 15) at the grid's size: fine-grained experts with a large k.
    "deepseek": dict(num_experts=64, top_k=6, ffn_div=8, router="sigmoid_topk", num_groups=8, topk_groups=4,
                     routed_scaling_factor=2.5, num_shared_experts=1, activation="swiglu"),
    "qwen": dict(num_experts=32, top_k=4, ffn_div=4, router="softmax_topk", normalize_topk=False,
                 num_shared_experts=1, shared_expert_gate=True, activation="swiglu"),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity-factors", default="1.0,1.25,2.0,dropless")
    p.add_argument("--ep-sizes", default="1,2,4")
    p.add_argument("--experts", default="8,16,64")
    p.add_argument("--top-k", default="1,2")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank (grid)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--designs", default="deepseek,qwen", help="today's designs to add ('' = none)")
    p.add_argument("--scaling-experts", default="8,16,64")
    p.add_argument("--scaling-capacity-factors", default="1.25,dropless")
    p.add_argument("--scaling-tokens", type=int, default=4096)
    p.add_argument("--scaling-hidden", type=int, default=512)
    p.add_argument("--scaling-ffn", type=int, default=2048)
    p.add_argument("--scaling-ep", type=int, default=2)
    p.add_argument("--scaling-iters", type=int, default=6)
    add_dtype_arg(p)
    p.add_argument("--scaling-only", action="store_true",
                   help="only the expert-scaling section (no grid, no designs)")
    p.add_argument("--tiny", action="store_true", help="smoke size: a 2x2 grid, small layer")
    p.add_argument("--out", default="benchmarks/results/layer_breakdown.json")
    a = p.parse_args(argv)
    if a.tiny:
        a.capacity_factors, a.ep_sizes, a.experts, a.top_k = "1.25,dropless", "1,2", "4", "2"
        a.designs = "qwen"
        a.tokens, a.hidden, a.ffn, a.iters, a.warmup = 1024, 128, 512, 10, 1
        a.scaling_experts, a.scaling_capacity_factors = "4,8", "1.25"
        a.scaling_tokens, a.scaling_hidden, a.scaling_ffn, a.scaling_iters = 1024, 128, 512, 3
    return a


def _points(a: argparse.Namespace, ep: int) -> list[dict]:
    pts = []
    if a.scaling_only:
        a = argparse.Namespace(**{**vars(a), "capacity_factors": "", "designs": ""})
    for cf, e, k in itertools.product(filter(None, a.capacity_factors.split(",")), a.experts.split(","),
                                      a.top_k.split(",")):
        if int(e) % ep == 0:
            pts.append({"section": "grid", "cf": cf, "experts": int(e), "top_k": int(k), "ep": ep,
                        "tokens": a.tokens, "hidden": a.hidden, "ffn": a.ffn})
    for name in filter(None, a.designs.split(",")):
        d = DESIGNS[name]
        if d["num_experts"] % ep == 0:
            for cf in filter(None, a.capacity_factors.split(",")):
                pts.append({"section": "designs", "design": name, "cf": cf, "experts": d["num_experts"],
                            "top_k": d["top_k"], "ep": ep, "tokens": a.tokens, "hidden": a.hidden,
                            "ffn": max(4, a.ffn // d["ffn_div"])})
    if ep == a.scaling_ep:
        for cf, e in itertools.product(a.scaling_capacity_factors.split(","), a.scaling_experts.split(",")):
            pts.append({"section": "scaling", "cf": cf, "experts": int(e), "top_k": 2, "ep": ep,
                        "tokens": a.scaling_tokens, "hidden": a.scaling_hidden, "ffn": a.scaling_ffn})
    return pts


def _worker(rank: int, world: int, points: list[dict], iters: int, warmup: int,
            scaling_iters: int, dtype: str = "fp32") -> list[dict]:
    from expert_parallel import MoEConfig, MoELayer, ParallelGroups
    from expert_parallel.profiling.profiler import MoEProfiler, ProfilerConfig

    groups = ParallelGroups.build(world)
    prec = precisions(dtype)[0]
    state = []
    for pt in points:
        kw = dict(activation="gelu", router="switch" if pt["top_k"] == 1 else "softmax_topk")
        if "design" in pt:
            kw = {k: v for k, v in DESIGNS[pt["design"]].items() if k not in ("num_experts", "top_k", "ffn_div")}
        cfg = MoEConfig(hidden_size=pt["hidden"], ffn_hidden_size=pt["ffn"], num_experts=pt["experts"],
                        top_k=pt["top_k"], capacity_factor=CF_CHOICES[pt["cf"]], **kw)
        layer = MoELayer(cfg, groups, seed=0)
        x = torch.randn(pt["tokens"], pt["hidden"], generator=torch.Generator().manual_seed(rank + 1))
        n = scaling_iters if pt["section"] == "scaling" else iters
        prof = MoEProfiler({"moe": layer}, groups, ProfilerConfig(start_step=warmup, num_steps=n))
        state.append({"pt": pt, "layer": layer, "x": x, "prof": prof, "steps": warmup + n,
                      "measured": [], "slowest": [], "slowest_cpu": []})
    # Interleave the points of a section iteration by iteration (rotating the order), so
    # drift in the machine's load (other jobs on the 2 cores) hits every point alike.
    for section in ("grid", "designs", "scaling"):
        items = [st for st in state if st["pt"]["section"] == section]
        if not items:
            continue
        for step in range(max(st["steps"] for st in items)):
            rot = step % len(items)
            for st in items[rot:] + items[:rot]:
                if step >= st["steps"]:
                    continue
                dist.barrier()
                for p in st["layer"].parameters():  # as the training loop's zero_grad(set_to_none=True)
                    p.grad = None
                st["prof"].step_begin(step)
                xx = st["x"].clone().requires_grad_(True)
                t0, c0 = time.perf_counter(), time.process_time()
                with prec.autocast("cpu"):
                    res = st["layer"](xx)
                    loss = res.output.float().square().mean() + res.aux_loss
                loss.backward()
                dt, cdt = time.perf_counter() - t0, time.process_time() - c0
                st["prof"].step_end(step, step_time_s=dt)
                t = torch.tensor([dt, cdt], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if step >= warmup:
                    st["measured"].append(dt)
                    st["slowest"].append(float(t[0]))
                    st["slowest_cpu"].append(float(t[1]))
        for st in items:  # free the big layers before the next section
            st["layer"] = st["x"] = None
    out = []
    for st in state:
        # Each rank: its own (phase sum) / (its own wall time), per measured iteration.
        recs = st["prof"].records
        # Pooled over iterations (sum of phase sums / sum of wall times): a rank can lose
        # the shared cores for milliseconds anywhere, in a phase or in the glue; pooling
        # spreads those losses in proportion, where a per-iteration ratio would swing.
        phase_sums = [rec["layers"]["moe"]["per_rank"]["phase_sum_s"][rank] for rec in recs]
        all_ratios = [ps / dt for ps, dt in zip(phase_sums, st["measured"])]
        ratios = [(sum(phase_sums), sum(st["measured"]))]
        out.append({"ratios": ratios, "all_ratios": all_ratios, **({"point": st["pt"], "records": recs, "slowest_s": st["slowest"],
                                          "slowest_cpu_s": st["slowest_cpu"]} if rank == 0 else {})})
    return out


def _summarize(pt: dict, records: list[dict], slowest: list[float], ratios: list[float],
               slowest_cpu: list[float]) -> dict:
    L = [r["layers"]["moe"] for r in records]
    n = len(L)
    phases = {p: {"forward_ms": 1e3 * sum(l["phases"][p]["forward_s"] for l in L) / n,
                  "backward_ms": 1e3 * sum(l["phases"][p]["backward_s"] for l in L) / n}
              for p in PHASE_ORDER if p in L[0]["phases"]}
    t = median(slowest)
    return {
        **{k: v for k, v in pt.items()},
        "layer_ms": 1e3 * t,
        "us_per_token": 1e6 * t / pt["tokens"],
        # CPU seconds of the slowest rank's process: immune to being descheduled by other
        # jobs on the shared cores, so the fairer basis for comparing configurations.
        "cpu_us_per_token": 1e6 * median(slowest_cpu) / pt["tokens"],
        "phases_ms": phases,
        # Pooled over ranks and iterations (see _worker).
        "phase_sum_over_measured": ratios[0] if ratios else None,
        "drop_fraction": sum(l["tokens"]["drop_fraction"] for l in L) / n,
        "padding_waste_fraction": sum(l["tokens"]["padding_waste_fraction"] for l in L) / n,
        "experts_max_over_mean": sum(l["imbalance"]["experts_routed_max_over_mean"] for l in L) / n,
        "ep_ranks_max_over_mean": sum(l["imbalance"]["ep_ranks_received_max_over_mean"] for l in L) / n,
        "dispatch_GBps": sum(l["a2a"]["dispatch"]["forward_GBps"] for l in L) / n,
        "a2a_share": sum(r["a2a_share"] or 0.0 for r in records) / n,
        "per_rank_routed_RE": L[-1]["per_rank"]["routed_RE"],
    }


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    rows = []
    for ep in [int(v) for v in a.ep_sizes.split(",")]:
        points = _points(a, ep)
        if not points:
            continue
        t0 = time.perf_counter()
        per_rank = spawn(_worker, ep, points, a.iters, a.warmup, a.scaling_iters, a.dtype, threads=1)
        for i, item in enumerate(per_rank[0]):
            pooled = [r for rank_out in per_rank for r in rank_out[i]["ratios"]]
            ratios = [sum(p for p, _ in pooled) / sum(m for _, m in pooled)] if pooled else []
            row = _summarize(item["point"], item["records"], item["slowest_s"], ratios, item["slowest_cpu_s"])
            every = [r for rank_out in per_rank for r in rank_out[i]["all_ratios"]]
            row["phase_sum_over_measured_all_iterations_median"] = median(every) if every else None
            rows.append(row)
        print(f"EP={ep}: {len(points)} points in {time.perf_counter() - t0:.0f}s", flush=True)
    grid = [r for r in rows if r["section"] == "grid"]
    scaling = [r for r in rows if r["section"] == "scaling"]
    designs = [r for r in rows if r["section"] == "designs"]
    growth, cpu_growth = {}, {}
    for cf in a.scaling_capacity_factors.split(","):
        pts = sorted((r for r in scaling if r["cf"] == cf), key=lambda r: r["experts"])
        if len(pts) >= 2:
            growth[cf] = {str(r["experts"]): r["us_per_token"] / pts[0]["us_per_token"] - 1.0 for r in pts}
            cpu_growth[cf] = {str(r["experts"]): r["cpu_us_per_token"] / pts[0]["cpu_us_per_token"] - 1.0
                              for r in pts}
    ratios = [r["phase_sum_over_measured"] for r in rows if r["phase_sum_over_measured"] is not None]
    report = {
        "benchmark": "layer_breakdown",
        "config": vars(a),
        **environment(),
        "rows": rows,
        "phase_sum_over_measured": {"min": min(ratios), "max": max(ratios)} if ratios else None,
        "time_per_token_growth_vs_fewest_experts": growth,
        "cpu_time_per_token_growth_vs_fewest_experts": cpu_growth,
        "target": "time per token grows at most 10% from 8 to 64 experts (top-k 2, EP 2, target size)",
    }
    md = [f"# MoE layer phase breakdown, forward+backward ({a.tokens} tokens/rank, D={a.hidden}, "
          f"F={a.ffn}, GELU experts, 1 thread/rank; ms, mean over ranks)", "",
          "| cf | EP | E | k | layer ms | router | permute | count x | dispatch a2a | experts | shared | "
          "combine a2a | unpermute | stats | phases/measured | drop % | pad waste % | max/mean E | "
          "max/mean EP | a2a share |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r: dict, p: str) -> str:
        v = r["phases_ms"].get(p)
        return f"{v['forward_ms'] + v['backward_ms']:.2f}" if v else ""

    for r in grid + designs + scaling:
        if r["section"] == "designs" and r is designs[0]:
            md += ["", "Today's designs (`DESIGNS`: deepseek = E=64, k=6, F/8, 8 groups keep 4, sigmoid + "
                   "scaling, 1 shared expert; qwen = E=32, k=4, F/4, gated shared expert; SwiGLU):", "",
                   md[2], md[3]]
        if r["section"] == "scaling" and r is scaling[0]:
            md += ["", f"Expert scaling at {a.scaling_tokens} tokens/rank, D={a.scaling_hidden}, "
                   f"F={a.scaling_ffn}, k=2, EP={a.scaling_ep}:", "", md[2], md[3]]
        label = f"{r['design']} {r['cf']}" if "design" in r else r["cf"]
        md.append(f"| {label} | {r['ep']} | {r['experts']} | {r['top_k']} | {r['layer_ms']:.2f} | "
                  + " | ".join(cell(r, p) for p in PHASE_ORDER[:-1])
                  + f" | {r['phase_sum_over_measured']:.3f} | {100 * r['drop_fraction']:.2f} | "
                  f"{100 * r['padding_waste_fraction']:.1f} | {r['experts_max_over_mean']:.2f} | "
                  f"{r['ep_ranks_max_over_mean']:.2f} | {100 * r['a2a_share']:.1f}% |")
    md += ["", "Phase columns are forward + backward ms (backward attributed per "
           "`expert_parallel/profiling/timer.py`). 'phases/measured' = sum over ranks and "
           "iterations of each rank's phase times over the sum of its wall times of "
           "forward+backward (the rest is Python glue and the loss). Wall times on a shared "
           f"2-core machine (load average at the end: {environment()['hardware'].get('load_average_1_5_15')}); "
           "CPU time per token is the less noisy basis for comparing configurations.",
           f"Expert backend `auto` = `{AUTO_BACKEND.get('cpu')}` on CPU (`moe/experts.py: AUTO_BACKEND`, measured by "
           "`benchmarks/expert_backends.py`); {dtype}. Weight gradients are set to None before every "
           "iteration, as the training loop's `zero_grad(set_to_none=True)` does (the results of earlier versions accumulated "
           "them: one more read-modify-write of every expert gradient per iteration).".replace(
               "{dtype}", f"precision {precisions(a.dtype)[0].name}")]
    for cf, g in growth.items():
        md.append(f"- wall time per token vs E={min(g, key=int)} at cf {cf}: "
                  + ", ".join(f"E={e}: {100 * v:+.1f}%" for e, v in g.items())
                  + "; CPU time per token: "
                  + ", ".join(f"E={e}: {100 * v:+.1f}%" for e, v in cpu_growth[cf].items()))

    def plot(plt) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        sel = [r for r in grid if r["top_k"] == max(int(k) for k in a.top_k.split(","))
               and r["experts"] == sorted(int(e) for e in a.experts.split(","))[len(a.experts.split(",")) // 2]]
        labels = [f"cf{r['cf']}\nEP{r['ep']}" for r in sel]
        bottom = [0.0] * len(sel)
        for p in PHASE_ORDER[:-1]:
            vals = [float(cell(r, p) or 0) for r in sel]
            axes[0].bar(labels, vals, bottom=bottom, label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        axes[0].set_ylabel("ms (fwd+bwd)")
        axes[0].set_title(f"phase breakdown, E={sel[0]['experts'] if sel else '?'}, k={sel[0]['top_k'] if sel else '?'}")
        axes[0].legend(fontsize=7)
        axes[0].tick_params(axis="x", labelsize=7)
        for cf in a.scaling_capacity_factors.split(","):
            pts = sorted((r for r in scaling if r["cf"] == cf), key=lambda r: r["experts"])
            axes[1].plot([r["experts"] for r in pts], [r["us_per_token"] for r in pts], marker="o",
                         label=f"cf {cf}, wall")
            axes[1].plot([r["experts"] for r in pts], [r["cpu_us_per_token"] for r in pts], marker="s",
                         linestyle="--", label=f"cf {cf}, CPU time")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("experts (k=2, EP fixed)")
        axes[1].set_ylabel("us per token (fwd+bwd)")
        axes[1].set_title("expert scaling")
        axes[1].legend()
        fig.tight_layout()

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    return report


if __name__ == "__main__":
    main()
