"""Alpha-beta model of the MoE all-to-all at cluster scale (8 to 1,024 GPUs).

Question: given the expert load the profiler measured, how long would dispatch and
combine take on a real cluster, what share of an MoE layer would they be, and does the
hierarchical (node-local hop, then one message per node pair) exchange beat the flat one?

Model (every number below is a CLI parameter; defaults describe an H800/H100-class node):

* ``L`` GPUs per node (8). Intra-node links are NVLink-class: ``B_nv`` GB/s per GPU per
  direction (160), per-message cost ``alpha_nv`` us (1). Inter-node links are one
  InfiniBand-class NIC per GPU: ``B_ib`` GB/s (50 = 400 Gb/s), per-message cost
  ``alpha_ib`` us (2), plus a fixed launch/sync latency ``alpha_0`` us (10) per exchange.
* A GPU's NVLink and NIC work concurrently; a GPU sends and receives concurrently; a
  phase ends when the slowest GPU's slowest engine is done:
  ``t = alpha_0 + max_g max(sum_intra bytes / B_nv + n_intra msgs * alpha_nv,
  sum_inter bytes / B_ib + n_inter msgs * alpha_ib)`` over send and receive sides. No
  switch congestion, no incast penalty, full bisection bandwidth.
* Flat exchange: one message from every GPU to every other GPU that has rows for it.
* Hierarchical exchange (ours, ``moe/dispatchers/hierarchical.py``): hop 1 over IB sends
  each token once per destination node (de-duplicated, DeepEP-style) to the GPU with the
  sender's local index there, hop 2 fans the rows out over NVLink; the hops run back to
  back. A token crosses IB once per destination node however many of its k experts live
  there, so inter-node bytes scale with the expected number of distinct destination
  nodes per token instead of k. ``deepep_style`` overlaps the two hops.
* Traffic: every GPU holds ``T`` tokens, routes each to k experts with the measured
  expert-load shape (the profiler's per-expert routed counts, sorted, stretched to E
  experts by quantile interpolation and shuffled over GPUs), dropless. Dispatch rows are
  ``D * dispatch_bytes`` wide, combine rows ``D * combine_bytes``; backward repeats both.
* Expert compute: ``6 * rows * D * F * matrices`` FLOP (forward + backward) at
  ``gpu_tflops`` effective TFLOP/s; overhead share = all-to-all time / (all-to-all +
  expert compute), no overlap (what the overlap dispatcher can hide is this share).

Calibration: the same model is evaluated at the settings of DeepEP's published
benchmarks (legacy V1 docs: H800, CX7 400 Gb/s, 4096 tokens, hidden 7168, top-8,
FP8 dispatch / BF16 combine; low-latency kernels at 128 tokens) and its predicted
bandwidth / latency is set beside the published one in the report.

    python benchmarks/cluster_model.py --profile benchmarks/results/compare_deepspeed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import environment, write_report  # noqa: E402

DEEPEP_SOURCE = "https://github.com/deepseek-ai/DeepEP/blob/main/docs/legacy.md (V1 performance tables)"
# Published DeepEP V1 figures (H800, ~160 GB/s NVLink, CX7 400 Gb/s ~50 GB/s RDMA).
# Normal kernels: 4096 tokens, hidden 7168, top-8 (top-4 groups), FP8 dispatch, BF16 combine:
# (EP, link, dispatch GB/s, combine GB/s).
DEEPEP_NORMAL = [(8, "nvlink", 153, 158), (16, "rdma", 43, 43), (32, "rdma", 58, 57), (64, "rdma", 51, 50)]
# Low-latency kernels (pure RDMA): 128 tokens, hidden 7168, top-8:
# (EP, dispatch us, dispatch GB/s, combine us, combine GB/s).
DEEPEP_LOW_LATENCY = [(8, 77, 98, 114, 127), (16, 118, 63, 195, 74), (32, 155, 48, 273, 53),
                      (64, 173, 43, 314, 46), (128, 192, 39, 369, 39), (256, 194, 39, 360, 40)]


@dataclass(frozen=True)
class Links:
    gpus_per_node: int = 8
    nvlink_GBps: float = 160.0
    ib_GBps: float = 50.0
    alpha_nv_us: float = 1.0
    alpha_ib_us: float = 2.0
    alpha_0_us: float = 10.0


def load_shape(path: str | None) -> list[float]:
    """Sorted (descending) per-expert load shares from a profiler record, or uniform."""
    if not path:
        return [1.0]
    with open(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
        records = data.get("profile", data.get("records", [data])) if isinstance(data, dict) else data
    except json.JSONDecodeError:  # a moe_profile.jsonl
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    totals: list[float] = []
    for rec in records:
        for layer in rec["layers"].values():
            per_expert = [sum(col) for col in zip(*layer["per_rank"]["routed_RE"])]
            totals = [a + b for a, b in zip(totals, per_expert)] if totals else per_expert
    s = sum(totals)
    return sorted((t / s for t in totals), reverse=True)


def expert_shares(shape: list[float], num_experts: int, seed: int) -> list[float]:
    """Stretch a sorted load shape to ``num_experts`` experts (quantile interpolation),
    normalise, and shuffle (which experts are hot is independent of where they live)."""
    m = len(shape)
    out = []
    for j in range(num_experts):
        q = (j + 0.5) / num_experts * m - 0.5
        lo = min(max(int(math.floor(q)), 0), m - 1)
        hi = min(lo + 1, m - 1)
        w = min(max(q - lo, 0.0), 1.0)
        out.append(shape[lo] * (1 - w) + shape[hi] * w)
    total = sum(out)
    out = [v / total for v in out]
    random.Random(seed).shuffle(out)
    return out


def distinct_fraction(q: list[float], k: int) -> float:
    """Expected distinct destinations per token over k draws from shares q, divided by k
    (with-replacement approximation of top-k without replacement; exact enough for
    the dedup factor)."""
    return sum(1.0 - (1.0 - x) ** k for x in q) / k


def exchange_time(n: int, links: Links, gpu_share: list[float], tokens: int, k: int, row_bytes: float,
                  algorithm: str, dedup: bool = False, pipelined: bool = False) -> dict:
    """Seconds of one all-to-all (dispatch direction) and the bytes per link kind.
    Every source GPU sends ``tokens * k * gpu_share[d]`` rows to GPU d. ``pipelined``:
    the two hierarchical hops overlap (DeepEP-style forwarding) instead of running back
    to back. ``rdma_logical_bytes``: tokens x distinct destination nodes (own node
    included) x row bytes -- how DeepEP counts its 'RDMA bandwidth'."""
    L = min(links.gpus_per_node, n)
    nodes = n // L
    rows_to = [tokens * k * s for s in gpu_share]  # from any one source GPU
    node_share = [sum(gpu_share[m * L:(m + 1) * L]) for m in range(nodes)]
    inter_factor = distinct_fraction(node_share, k) if (dedup and nodes > 1) else 1.0
    a_nv, a_ib, a0 = links.alpha_nv_us * 1e-6, links.alpha_ib_us * 1e-6, links.alpha_0_us * 1e-6
    bnv, bib = links.nvlink_GBps * 1e9, links.ib_GBps * 1e9
    worst, nv_bytes_max, ib_bytes_max = 0.0, 0.0, 0.0
    for g in range(n):
        node, local = divmod(g, L)
        # Bytes this GPU sends (source side: same for every source) and receives.
        if algorithm == "flat":
            intra_send = sum(rows_to[d] for d in range(node * L, node * L + L) if d != g) * row_bytes
            inter_send = sum(rows_to[d] for d in range(n) if d // L != node) * row_bytes
            intra_recv = rows_to[g] * (L - 1) * row_bytes
            inter_recv = rows_to[g] * (n - L) * row_bytes
            n_intra, n_inter = L - 1, n - L
            t = max(intra_send / bnv + n_intra * a_nv, inter_send / bib + n_inter * a_ib,
                    intra_recv / bnv + n_intra * a_nv, inter_recv / bib + n_inter * a_ib)
        else:
            # Ours (moe/dispatchers/hierarchical.py), DeepEP's order: hop 1 across nodes to the
            # GPU with my local index, one row per (token, destination node) when ``dedup``;
            # hop 2 fans rows out inside the node over NVLink.
            inter_send = sum(rows_to[d] for d in range(n) if d // L != node) * row_bytes * inter_factor
            inter_recv = sum(rows_to[node * L + j] for j in range(L)) * (nodes - 1) * row_bytes * inter_factor
            # The relay forwards, for every local j != mine, the rows of all `nodes` sources.
            intra_send = sum(rows_to[node * L + j] for j in range(L) if j != local) * nodes * row_bytes
            intra_recv = rows_to[g] * nodes * (L - 1) * row_bytes
            t1 = max(inter_send, inter_recv) / bib + (nodes - 1) * a_ib if nodes > 1 else 0.0
            t2 = max(intra_send, intra_recv) / bnv + (L - 1) * a_nv
            if pipelined:
                t = max(t1, t2)
            else:
                t = t1 + t2 + (a0 if nodes > 1 else 0.0)  # two exchanges: one more launch
        worst = max(worst, t)
        nv_bytes_max = max(nv_bytes_max, intra_send, intra_recv)
        ib_bytes_max = max(ib_bytes_max, inter_send, inter_recv)
    logical = tokens * k * distinct_fraction(node_share, k) * row_bytes
    return {"seconds": worst + a0, "nvlink_bytes_per_gpu": nv_bytes_max, "ib_bytes_per_gpu": ib_bytes_max,
            "rdma_logical_bytes": logical}


ALGORITHMS = ("flat", "hierarchical", "deepep_style")
"""flat: direct exchange; hierarchical: ours (per-node token dedup, inter-node hop then
intra-node fan-out, back to back); deepep_style: the same with the two hops overlapped."""


def predict(n: int, a: argparse.Namespace, links: Links, shape: list[float], algorithm: str,
            tokens: int) -> dict:
    E = max(a.experts, n)
    shares = expert_shares(shape, E, a.seed)
    per_gpu = E // n
    gpu_share = [sum(shares[g * per_gpu:(g + 1) * per_gpu]) for g in range(n)]
    deepep = algorithm == "deepep_style"
    alg = "flat" if algorithm == "flat" else "hierarchical"
    dedup = alg == "hierarchical"
    disp = exchange_time(n, links, gpu_share, tokens, a.top_k, a.hidden * a.dispatch_bytes, alg, dedup, deepep)
    comb = exchange_time(n, links, gpu_share, tokens, a.top_k, a.hidden * a.combine_bytes, alg, dedup, deepep)
    a2a = 2 * (disp["seconds"] + comb["seconds"])  # forward + backward
    rows = max(gpu_share) * n * tokens * a.top_k  # the busiest GPU's expert rows
    compute = 6 * rows * a.hidden * a.ffn * a.matrices / (a.gpu_tflops * 1e12)
    return {"gpus": n, "algorithm": algorithm, "experts": E, "tokens_per_gpu": tokens,
            "dispatch_ms": 1e3 * disp["seconds"], "combine_ms": 1e3 * comb["seconds"],
            "a2a_fwd_bwd_ms": 1e3 * a2a, "expert_compute_ms": 1e3 * compute,
            "overhead_share": a2a / (a2a + compute), "gpu_load_max_over_mean": max(gpu_share) * n,
            "dispatch_ib_GBps": disp["ib_bytes_per_gpu"] / disp["seconds"] / 1e9,
            "dispatch_nvlink_GBps": disp["nvlink_bytes_per_gpu"] / disp["seconds"] / 1e9}


def calibrate(links: Links) -> dict:
    """The model at DeepEP's published settings (uniform routing), beside their figures,
    plus a least-squares fit of (alpha_0, alpha_ib, B_ib) to the low-latency table."""
    import numpy as np

    fp8 = 7168 + 7168 / 128 * 4  # FP8 values + one fp32 scale per 128 channels
    normal, low = [], []
    for ep, link, pub_d, pub_c in DEEPEP_NORMAL:
        gpu_share = [1.0 / ep] * ep
        res = []
        for row_bytes in (fp8, 7168 * 2):
            if ep <= links.gpus_per_node:
                r = exchange_time(ep, links, gpu_share, 4096, 8, row_bytes, "flat")
                res.append(r["nvlink_bytes_per_gpu"] / r["seconds"] / 1e9)
            else:
                r = exchange_time(ep, links, gpu_share, 4096, 8, row_bytes, "hierarchical", True, True)
                res.append(r["rdma_logical_bytes"] / r["seconds"] / 1e9)
        normal.append({"ep": ep, "link": link, "published_dispatch_GBps": pub_d, "published_combine_GBps": pub_c,
                       "model_dispatch_GBps": res[0], "model_combine_GBps": res[1]})
    rows_fit, y_fit = [], []
    for ep, pd_us, pd_bw, pc_us, pc_bw in DEEPEP_LOW_LATENCY:
        gpu_share = [1.0 / ep] * ep
        d = exchange_time(ep, links, gpu_share, 128, 8, fp8, "flat")
        c = exchange_time(ep, links, gpu_share, 128, 8, 7168 * 2, "flat")
        low.append({"ep": ep, "published_dispatch_us": pd_us, "model_dispatch_us": 1e6 * d["seconds"],
                    "published_combine_us": pc_us, "model_combine_us": 1e6 * c["seconds"],
                    "published_dispatch_GBps": pd_bw, "published_combine_GBps": pc_bw})
        if ep > links.gpus_per_node:
            inter_msgs = ep - links.gpus_per_node
            inter_bytes = 128 * 8 * fp8 * inter_msgs / ep
            rows_fit.append([1.0, inter_msgs, inter_bytes])
            y_fit.append(pd_us * 1e-6)
    coef, *_ = np.linalg.lstsq(np.array(rows_fit), np.array(y_fit), rcond=None)
    fit = {"alpha_0_us": 1e6 * coef[0], "alpha_ib_us_per_peer": 1e6 * coef[1],
           "ib_GBps": (1 / coef[2] / 1e9) if coef[2] > 0 else None,
           "note": "least squares of published low-latency dispatch times, EP > one node"}
    return {"source": DEEPEP_SOURCE, "normal_kernels": normal, "low_latency_kernels": low,
            "low_latency_fit": fit}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="benchmarks/results/compare_deepspeed.json",
                   help="JSON with profiler records (per-rank per-expert counts); '' = uniform")
    p.add_argument("--gpus", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU (training-size batch)")
    p.add_argument("--small-tokens", type=int, default=128, help="tokens per GPU (decode-size batch)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048, help="expert FFN width")
    p.add_argument("--matrices", type=int, default=3, help="weight matrices per expert (3 = SwiGLU)")
    p.add_argument("--experts", type=int, default=256, help="experts (at least one per GPU)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dispatch-bytes", type=float, default=1.0 + 4 / 128, help="bytes per element (FP8+scales)")
    p.add_argument("--combine-bytes", type=float, default=2.0, help="bytes per element (BF16)")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="effective expert GEMM TFLOP/s")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="rows the modelled exchanges move: auto = the byte options above (a GPU "
                        "cluster's bf16 run with DeepEP-style FP8 dispatch); bf16 = 2 bytes, fp32 = 4 "
                        "bytes per element both ways (override --dispatch-bytes/--combine-bytes)")
    for f in Links.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/cluster_model.json")
    a = p.parse_args(argv)
    if a.dtype != "auto":
        a.dispatch_bytes = a.combine_bytes = {"bf16": 2.0, "fp32": 4.0}[a.dtype]
    links = Links(**{f: getattr(a, f) for f in Links.__dataclass_fields__})
    shape = load_shape(a.profile)
    rows = [predict(n, a, links, shape, alg, tokens) for tokens in (a.tokens, a.small_tokens)
            for n in (int(v) for v in a.gpus.split(",")) for alg in ALGORITHMS
            if n >= links.gpus_per_node and n % links.gpus_per_node == 0]
    cal = calibrate(links)
    report = {"benchmark": "cluster_model", "config": vars(a), "links": asdict(links), **environment(),
              "measured_load_shape": shape, "load_max_over_mean": max(shape) * len(shape),
              "predictions": rows, "calibration_vs_published": cal}
    md = [f"# All-to-all at cluster scale: alpha-beta model ({a.tokens} tokens/GPU, hidden {a.hidden}, "
          f"top-{a.top_k}, E={a.experts}, FP8-ish dispatch / BF16 combine, {links.gpus_per_node} GPUs/node, "
          f"NVLink {links.nvlink_GBps:g} GB/s, IB {links.ib_GBps:g} GB/s)", "",
          f"Expert load shape from `{a.profile or 'uniform'}` (max/mean {max(shape) * len(shape):.2f} "
          "over the measured experts), dropless.", "",
          "| tokens/GPU | GPUs | exchange | dispatch ms | combine ms | a2a fwd+bwd ms | expert ms | overhead share | IB GB/s |",
          "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['tokens_per_gpu']} | {r['gpus']} | {r['algorithm']} | {r['dispatch_ms']:.2f} | {r['combine_ms']:.2f} | "
                  f"{r['a2a_fwd_bwd_ms']:.2f} | {r['expert_compute_ms']:.2f} | {100 * r['overhead_share']:.0f}% | "
                  f"{r['dispatch_ib_GBps']:.1f} |")
    md += ["", f"## Model vs published DeepEP figures ({DEEPEP_SOURCE})", "",
           "Normal kernels (4096 tokens, hidden 7168, top-8; model: uniform routing; one node: "
           "flat, NVLink GB/s; across nodes: deepep_style, logical RDMA GB/s = tokens x distinct "
           "destination nodes x row bytes / time):", "",
           "| EP | link | published dispatch GB/s | model | published combine GB/s | model |",
           "|---:|---|---:|---:|---:|---:|"]
    for c in cal["normal_kernels"]:
        md.append(f"| {c['ep']} | {c['link']} | {c['published_dispatch_GBps']} | {c['model_dispatch_GBps']:.0f} | "
                  f"{c['published_combine_GBps']} | {c['model_combine_GBps']:.0f} |")
    md += ["", "Low-latency kernels (128 tokens, pure RDMA; model: flat, one GPU per 'node'):", "",
           "| EP | published dispatch us | model | published combine us | model |", "|---:|---:|---:|---:|---:|"]
    for c in cal["low_latency_kernels"]:
        md.append(f"| {c['ep']} | {c['published_dispatch_us']} | {c['model_dispatch_us']:.0f} | "
                  f"{c['published_combine_us']} | {c['model_combine_us']:.0f} |")
    f = cal["low_latency_fit"]
    md += ["", f"Fit to the published low-latency dispatch times (EP >= 16): alpha_0 = {f['alpha_0_us']:.0f} us, "
           f"alpha per IB peer = {f['alpha_ib_us_per_peer']:.2f} us, IB bandwidth = "
           f"{f['ib_GBps'] if f['ib_GBps'] is None else round(f['ib_GBps'], 1)} GB/s."]

    def plot(plt) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for alg in ALGORITHMS:
            pts = [r for r in rows if r["algorithm"] == alg and r["tokens_per_gpu"] == a.tokens]
            axes[0].plot([r["gpus"] for r in pts], [r["a2a_fwd_bwd_ms"] for r in pts], marker="o", label=alg)
            axes[1].plot([r["gpus"] for r in pts], [100 * r["overhead_share"] for r in pts], marker="o", label=alg)
        for ax, title in zip(axes, (f"all-to-all per layer, fwd+bwd (ms), {a.tokens} tokens/GPU",
                                    "all-to-all share of MoE layer (%)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("GPUs (EP size)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    return report


if __name__ == "__main__":
    main()
