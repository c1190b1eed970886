"""Expert backends against each other: per-expert loop, padded bmm, torch._grouped_mm.

Question: which way of computing a rank's local experts is fastest on this device, and
does it stay cheap as the experts get many and small (E = 8 ... 128 at fixed k)? The
answer is the table ``expert_backend="auto"`` follows (``moe/experts.py: AUTO_BACKEND``).

Method: one process, one intra-op thread (as each rank of the layer benchmarks), the
``GroupedExperts`` of one EP rank (``E / ep`` local experts of D x F GELU MLPs, the
layer_breakdown scaling size), the rows that rank receives in the layer (``tokens * k``
for EP ranks of equal load), spread over its experts by seeded uniform routing. One
iteration = forward + backward (loss = mean square), the weight gradients set to None
before each, as the training loop's ``zero_grad(set_to_none=True)`` does. Every
(E, dtype, backend) point is measured in the same loop, iteration by iteration, the
backend order rotating, so load drift on the shared machine hits all points alike.
Reported: the median CPU time (``process_time``: immune to being descheduled) and wall
time per iteration, and each backend's growth from the fewest experts.

    nice -n 10 python benchmarks/expert_backends.py                  # E=8..128, fp32 + bf16
    python benchmarks/expert_backends.py --tiny --out /tmp/eb.json    # smoke size (tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._common import environment, median, precisions, write_report  # noqa: E402
from expert_parallel import MoEConfig  # noqa: E402
from expert_parallel.moe.experts import AUTO_BACKEND, GroupedExperts  # noqa: E402

BACKENDS = ("loop", "bmm", "grouped_mm")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="8,16,32,64,128", help="total experts E (local: E / ep)")
    p.add_argument("--ep", type=int, default=2, help="EP size whose one rank is measured")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke size")
    p.add_argument("--out", default="benchmarks/results/expert_backends.json")
    a = p.parse_args(argv)
    if a.tiny:
        a.experts, a.tokens, a.hidden, a.ffn, a.iters, a.warmup = "4,8", 128, 32, 64, 2, 1
    return a


def _experts(a: argparse.Namespace, E: int) -> tuple[GroupedExperts, list[int], torch.Tensor]:
    e = E // a.ep
    cfg = MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=E, top_k=a.top_k,
                    activation=a.activation)
    experts = GroupedExperts(cfg, list(range(e)), seed=0)
    gen = torch.Generator().manual_seed(E)
    rows = a.tokens * a.top_k
    counts = torch.bincount(torch.randint(0, e, (rows,), generator=gen), minlength=e).tolist()
    return experts, counts, torch.randn(rows, a.hidden, generator=gen)


def _iteration(experts: GroupedExperts, counts: list[int], x: torch.Tensor, backend: str, prec) -> tuple[float, float]:
    experts.config = experts.config.replace(expert_backend=backend)
    for p in experts.parameters():
        p.grad = None
    xx = x.clone().requires_grad_(True)
    t0, c0 = time.perf_counter(), time.process_time()
    with prec.autocast("cpu"):
        y = experts(xx, counts)
        loss = y.float().square().mean()
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    torch.set_num_threads(a.threads)
    Es = [int(v) for v in a.experts.split(",")]
    precs = precisions(a.dtype)
    setups = {E: _experts(a, E) for E in Es}
    points = [(E, prec, be) for prec in precs for E in Es for be in BACKENDS]
    wall: dict = {(E, p.name, be): [] for E, p, be in points}
    cpu: dict = {k: [] for k in wall}
    for it in range(a.warmup + a.iters):
        rot = it % len(points)
        for E, prec, be in points[rot:] + points[:rot]:
            w, c = _iteration(*setups[E], be, prec)
            if it >= a.warmup:
                wall[(E, prec.name, be)].append(w)
                cpu[(E, prec.name, be)].append(c)
        print(f"iteration {it + 1}/{a.warmup + a.iters} done", flush=True)
    rows = []
    for (E, dtype, be), ws in wall.items():
        rows.append({"experts": E, "local_experts": E // a.ep, "dtype": dtype, "backend": be,
                     "wall_ms": 1e3 * median(ws), "cpu_ms": 1e3 * median(cpu[(E, dtype, be)]),
                     "rows": a.tokens * a.top_k, "wall_all_ms": [1e3 * v for v in ws],
                     "cpu_all_ms": [1e3 * v for v in cpu[(E, dtype, be)]]})
    best, growth = {}, {}
    for prec in precs:
        d = prec.name
        growth[d] = {}
        for be in BACKENDS:
            base = next(r for r in rows if r["dtype"] == d and r["backend"] == be and r["experts"] == Es[0])
            growth[d][be] = {str(r["experts"]): r["cpu_ms"] / base["cpu_ms"] - 1.0
                             for r in rows if r["dtype"] == d and r["backend"] == be}
        best[d] = {str(E): min((r for r in rows if r["dtype"] == d and r["experts"] == E),
                               key=lambda r: r["cpu_ms"])["backend"] for E in Es}
    # Fixed cost per local expert: least squares of CPU ms = a + b * local experts. The
    # FLOPs are the same at every E; b is what each expert costs whatever its rows
    # (its weights packed / cast and its gradient written every step).
    per_expert = {}
    for prec in precs:
        for be in BACKENDS:
            pts = [(r["local_experts"], r["cpu_ms"]) for r in rows if r["dtype"] == prec.name and r["backend"] == be]
            n = len(pts)
            mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
            var = sum((x - mx) ** 2 for x, _ in pts)
            b = sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0
            per_expert.setdefault(prec.name, {})[be] = {"ms_per_local_expert": b, "ms_intercept": my - b * mx}
    # The backend 'auto' should pick on this device: the lowest total CPU time over every
    # E and dtype measured (one choice per device: a per-E switch would change kernels
    # between layers of one model for a few percent).
    totals = {be: sum(r["cpu_ms"] / min(q["cpu_ms"] for q in rows if q["dtype"] == r["dtype"]
                                         and q["experts"] == r["experts"])
                      for r in rows if r["backend"] == be) for be in BACKENDS}
    pick = min(totals, key=totals.get)
    report = {"benchmark": "expert_backends", "config": vars(a), **environment(), "rows": rows,
              "best_per_experts": best, "cpu_growth_vs_fewest_experts": growth,
              "relative_cpu_time_sum": totals, "fixed_cost_per_local_expert": per_expert, "recommended_auto": pick,
              "auto_backend_table": dict(AUTO_BACKEND)}
    md = [f"# Expert backends: one EP rank's experts, forward + backward ({a.tokens} tokens x k={a.top_k} "
          f"rows, D={a.hidden}, F={a.ffn}, {a.activation}, EP={a.ep}, {a.threads} thread)", "",
          "Median CPU ms per iteration (wall ms in brackets); growth = CPU time vs "
          f"E={Es[0]} for the same backend.", ""]
    for prec in precs:
        d = prec.name
        md += [f"## {d}", "", "| E | local experts | " + " | ".join(BACKENDS) + " | best | "
               + " | ".join(f"{be} growth" for be in BACKENDS) + " |",
               "|---:|---:|" + "---:|" * len(BACKENDS) + "---|" + "---:|" * len(BACKENDS)]
        for E in Es:
            cells = []
            for be in BACKENDS:
                r = next(r for r in rows if r["dtype"] == d and r["backend"] == be and r["experts"] == E)
                cells.append(f"{r['cpu_ms']:.4g} ({r['wall_ms']:.4g})")
            md.append(f"| {E} | {E // a.ep} | " + " | ".join(cells) + f" | {best[d][str(E)]} | "
                      + " | ".join(f"{100 * growth[d][be][str(E)]:+.1f}%" for be in BACKENDS) + " |")
        md.append("")
        md.append("Fit CPU ms = a + b x local experts: " + ", ".join(
            f"{be} b = {per_expert[d][be]['ms_per_local_expert']:.2f} ms/expert (a = "
            f"{per_expert[d][be]['ms_intercept']:.0f} ms)" for be in BACKENDS) + ".")
        md.append("")
    md += ["Sum over every point of CPU time / the point's best: "
           + ", ".join(f"{be} {v:.3f}" for be, v in totals.items())
           + f" (1.0 per point = always best). **auto on this device: `{pick}`** "
           f"(`moe/experts.py: AUTO_BACKEND` = {dict(AUTO_BACKEND)}).",
           f"Load average at the end: {environment()['hardware'].get('load_average_1_5_15')} "
           "(a shared 2-core machine; CPU time is the basis of the comparison)."]

    def plot(plt) -> None:
        fig, axes = plt.subplots(1, len(precs), figsize=(6 * len(precs), 4), squeeze=False)
        for ax, prec in zip(axes[0], precs):
            for be in BACKENDS:
                pts = sorted((r for r in rows if r["dtype"] == prec.name and r["backend"] == be),
                             key=lambda r: r["experts"])
                ax.plot([r["experts"] for r in pts], [r["cpu_ms"] for r in pts], marker="o", label=be)
            ax.set_xscale("log", base=2)
            ax.set(title=f"{prec.name}: experts fwd+bwd, one rank", xlabel="experts E (k fixed)",
                   ylabel="CPU ms per iteration")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    return report


if __name__ == "__main__":
    main()
