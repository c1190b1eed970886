"""Our MoE layer against DeepSpeed-MoE and against the floors, same processes, same run.

Question: on the issue's target config, how much faster / leaner than DeepSpeed's
``deepspeed.moe.layer.MoE`` is our layer (forward + backward), and how close is it to
the floor, i.e. to the cost of only moving the bytes and only running the experts?

Per iteration, on the same EP ranks and in alternating order, each rank times:

* ``ours``: ``MoELayer`` (softmax top-k, position drop priority, GELU MLP experts).
* ``deepspeed``: ``deepspeed.moe.layer.MoE`` with the same sizes, a bias-free GELU MLP
  expert, ``drop_tokens=True``, ``use_rts=False``, ``top2_2nd_expert_sampling=False``
  (deterministic top-2 like ours); EP groups from ``set_deepspeed_parallelism()``.
  Same capacity rule: ``C = ceil(cf * T * k / E)`` per expert per source rank.
* ``floor``: (a) raw ``all_to_all_single`` with exactly our layer's splits, four times
  (dispatch + combine, forward + backward: the bytes our layer moves), plus (b) the raw
  expert MLPs (two GEMMs + GELU, forward + backward incl. weight grads) over exactly the
  rows our experts receive (the kept tokens), one GEMM chain per local expert.

Timing: each measurement is the slowest rank's wall time after a barrier; reported
value = median over iterations. Memory: peak live tensor bytes allocated during one
forward+backward (``torch.profiler`` memory events, see ``benchmarks/_common.py``),
maximum over ranks. Our layer is also profiled (``MoEProfiler``) for two steps; that
record, with per-rank per-expert counts, is stored for ``cluster_model.py``.

    DS_ACCELERATOR=cpu nice -n 10 python benchmarks/compare_deepspeed.py           # target config
    python benchmarks/compare_deepspeed.py --capacity-factor 2.0 --out benchmarks/results/compare_deepspeed_cf2.json
    python benchmarks/compare_deepspeed.py --tokens 128 --hidden 32 --ffn 64 --iters 2 --out /tmp/c.json  # smoke

Keys: ``speedup_vs_deepspeed`` (DeepSpeed time / ours), ``memory_ratio_vs_deepspeed``
(our peak / DeepSpeed's), ``efficiency_vs_floor`` (floor time / ours).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any deepspeed import (also in children)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._common import environment, median, peak_alloc_bytes, spawn, timed_max, write_report  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/compare_deepspeed.json")
    return p.parse_args(argv)


def _loss(y: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    return y.float().square().mean() + aux


def _worker(rank: int, world: int, a: argparse.Namespace) -> dict:
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    from expert_parallel import MoEConfig, MoELayer, ParallelGroups
    from expert_parallel.profiling.profiler import MoEProfiler, ProfilerConfig

    deepspeed.init_distributed(dist_backend="gloo")
    groups = ParallelGroups.build(a.ep)
    cfg = MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=a.top_k,
                    capacity_factor=a.capacity_factor, eval_capacity_factor=a.capacity_factor,
                    activation="gelu", aux_loss_coeff=0.01)
    ours = MoELayer(cfg, groups, seed=a.seed)
    torch.manual_seed(a.seed)
    expert = torch.nn.Sequential(torch.nn.Linear(a.hidden, a.ffn, bias=False), torch.nn.GELU(),
                                 torch.nn.Linear(a.ffn, a.hidden, bias=False))
    ds = DSMoE(hidden_size=a.hidden, expert=expert, num_experts=a.experts, ep_size=a.ep, k=a.top_k,
               capacity_factor=a.capacity_factor, eval_capacity_factor=a.capacity_factor,
               min_capacity=cfg.min_capacity, drop_tokens=True, use_rts=False,
               top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    # Same router weights, so both see the same routing decisions (up to fp ties).
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=gen)

    def run_ours() -> None:
        xx = x.clone().requires_grad_(True)
        out = ours(xx)
        _loss(out.output, out.aux_loss).backward()

    def run_ds() -> None:
        xx = x.clone().requires_grad_(True)
        y, l_aux, _ = ds(xx)
        _loss(y, 0.01 * l_aux).backward()

    # Exact splits of our layer's exchange: what each rank keeps per expert, all-gathered.
    out = ours(x)
    kept_RE = torch.stack([t for t in _gather(out.stats.kept_E)]).tolist()
    e_local, me = a.experts // a.ep, groups.ep_rank
    members = list(groups.ep_ranks)
    in_splits = [sum(kept_RE[rank][d * e_local:(d + 1) * e_local]) for d in range(a.ep)]
    out_splits = [sum(kept_RE[s][me * e_local:(me + 1) * e_local]) for s in members]
    rows_per_expert = [sum(kept_RE[s][me * e_local + l] for s in members) for l in range(e_local)]
    send = torch.randn(sum(in_splits), a.hidden)
    back = torch.randn(sum(out_splits), a.hidden)
    w1 = [torch.randn(a.hidden, a.ffn, requires_grad=True) for _ in range(e_local)]
    w2 = [torch.randn(a.ffn, a.hidden, requires_grad=True) for _ in range(e_local)]
    xe = [torch.randn(n, a.hidden, requires_grad=True) for n in rows_per_expert]

    def a2a(src: torch.Tensor, o: list[int], i: list[int]) -> None:
        dst = src.new_empty(sum(o), a.hidden)
        dist.all_to_all_single(dst, src, o, i, group=groups.ep_group)

    def run_a2a_floor() -> None:
        a2a(send, out_splits, in_splits)   # dispatch forward
        a2a(back, in_splits, out_splits)   # combine forward
        a2a(send, out_splits, in_splits)   # combine backward (dispatch direction)
        a2a(back, in_splits, out_splits)   # dispatch backward (combine direction)

    def run_gemm_floor() -> None:
        for l in range(e_local):
            F.gelu(xe[l] @ w1[l]).matmul(w2[l]).sum().backward()

    impls = {"ours": run_ours, "deepspeed": run_ds, "floor_a2a": run_a2a_floor, "floor_experts": run_gemm_floor}
    times: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for it in range(a.warmup + a.iters):
        order = names if it % 2 == 0 else names[::-1]  # alternate to cancel drift
        for name in order:
            t = timed_max(impls[name])
            if it >= a.warmup:
                times[name].append(t)
    # Peak memory, one fwd+bwd each (grads already allocated by the warmup: equal footing).
    peaks = {}
    for name in ("ours", "deepspeed"):
        dist.barrier()
        peaks[name] = peak_alloc_bytes(impls[name])
    peak_t = torch.tensor([peaks["ours"], peaks["deepspeed"]], dtype=torch.float64)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    # Our layer's phase breakdown for two steps (kept for cluster_model.py).
    prof = MoEProfiler({"moe": ours}, groups, ProfilerConfig(start_step=0, num_steps=2))
    for step in range(2):
        prof.step_begin(step)
        dt = timed_max(run_ours)
        prof.step_end(step, step_time_s=dt)
    return {"times": times, "peak_bytes": {"ours": peak_t[0].item(), "deepspeed": peak_t[1].item()},
            "profile": prof.records, "rows_per_expert": rows_per_expert,
            "ds_rows_per_rank": a.experts * cfg.capacity(a.tokens, True),
            "drop_fraction": out.stats.drop_fraction}


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    if a.experts % a.ep:
        raise ValueError(f"--experts={a.experts} must be divisible by --ep={a.ep}")
    results = spawn(_worker, a.ep, a, threads=a.threads)
    r0 = results[0]
    med = {k: median(v) for k, v in r0["times"].items()}
    floor = med["floor_a2a"] + med["floor_experts"]
    rows_ours = [sum(r["rows_per_expert"]) for r in results]
    report = {
        "benchmark": "compare_deepspeed",
        "config": {k: v for k, v in vars(a).items()},
        **environment(),
        "times_s": {k: {"median": med[k], "all": r0["times"][k]} for k in med},
        "floor_s": floor,
        "speedup_vs_deepspeed": med["deepspeed"] / med["ours"],
        "memory_ratio_vs_deepspeed": r0["peak_bytes"]["ours"] / r0["peak_bytes"]["deepspeed"],
        "efficiency_vs_floor": floor / med["ours"],
        "peak_bytes": r0["peak_bytes"],
        "expert_rows_per_rank": {"ours": rows_ours, "deepspeed": r0["ds_rows_per_rank"]},
        "drop_fraction_ours": [r["drop_fraction"] for r in results],
        "profile": r0["profile"],
        "memory_method": "peak live tensor bytes during one fwd+bwd, torch.profiler memory events",
    }
    cf = a.capacity_factor
    targets = {1.25: (1.1, 0.85), 2.0: (1.7, 0.6)}.get(cf)
    report["targets"] = {
        "speedup_vs_deepspeed_min": targets[0] if targets else None,
        "memory_ratio_vs_deepspeed_max": targets[1] if targets else None,
        "efficiency_vs_floor_min": 1 / 1.15,
    }
    ms = {k: 1e3 * v for k, v in med.items()}
    md = [f"# Our MoE layer vs DeepSpeed-MoE vs floor (cf {cf}, E={a.experts}, k={a.top_k}, "
          f"{a.tokens} tokens/rank, D={a.hidden}, F={a.ffn}, EP={a.ep}, {a.threads} thread/rank, fwd+bwd)", "",
          "| implementation | median ms | peak MiB | expert rows/rank |", "|---|---:|---:|---:|",
          f"| ours | {ms['ours']:.1f} | {r0['peak_bytes']['ours'] / 2**20:.1f} | {max(rows_ours)} |",
          f"| DeepSpeed MoE | {ms['deepspeed']:.1f} | {r0['peak_bytes']['deepspeed'] / 2**20:.1f} | "
          f"{r0['ds_rows_per_rank']} |",
          f"| floor: raw all-to-all x4 | {ms['floor_a2a']:.1f} | | |",
          f"| floor: raw expert GEMMs | {ms['floor_experts']:.1f} | | {max(rows_ours)} |",
          f"| floor total | {1e3 * floor:.1f} | | |", "",
          f"speedup vs DeepSpeed **{report['speedup_vs_deepspeed']:.2f}x**"
          + (f" (target >= {targets[0]}x)" if targets else ""),
          f", peak memory ratio **{report['memory_ratio_vs_deepspeed']:.2f}**"
          + (f" (target <= {targets[1]})" if targets else ""),
          f", efficiency vs floor **{report['efficiency_vs_floor']:.2f}** (our time "
          f"{med['ours'] / floor:.2f}x the floor; target <= 1.15x)"]

    def plot(plt) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = ["ours", "DeepSpeed", "floor"]
        ax.barh(labels, [ms["ours"], ms["deepspeed"], 0], color=["C0", "C1", "C2"])
        ax.barh(["floor"], [ms["floor_experts"]], color="C2", label="expert GEMMs")
        ax.barh(["floor"], [ms["floor_a2a"]], left=[ms["floor_experts"]], color="C3", label="all-to-all")
        ax.set_xlabel("ms per forward+backward (slowest rank, median)")
        ax.set_title(f"MoE layer, cf {cf}")
        ax.legend(loc="lower right", fontsize=8)

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    return report


if __name__ == "__main__":
    main()
