"""MoE against the dense model it replaces: does the FLOP saving become a wall-clock win?

Question: trained on the same data for the same steps, does an MoE transformer with the
dense model's *active* parameters per token reach a lower loss, and does that survive the
dispatch, synchronisation and imbalance it pays -- per step, at equal wall time, and
(predicted) on a GPU cluster?

Models (the launcher's transformer, ``ModelConfig`` defaults: D=128, 4 layers, 4 heads,
seq 128; built-in corpus; the launcher's optimiser, schedule and loss):

* ``dense``: ``moe_every=0``, every FFN a GELU MLP of ``k * F`` (= 512);
* ``moe``: E=8 experts of F=256, top-2 (k x expert FFN = dense FFN: equal active
  parameters and FLOPs per token, 4x the FFN parameters), capacity factor 1.25;
* ``moe_wide`` (``--wide``): E=8 experts of F=512, top-1 (switch router): equal active
  compute again, E = 8x the FFN parameters.

Method: at each EP size (2, 4: world = EP, one intra-op thread per rank) ONE spawn builds
every model as a launcher ``Trainer`` (``training/trainer.py``: same model, data, engine,
``train_step`` and ``evaluate``) and trains them step by step interleaved (rotating
order), so load drift on the shared machine hits all of them alike. Per step every rank
records its step time, the MoE phases (``PhaseTimer``) and the attention / dense-FFN
forward + backward time (module hooks); validation every ``--eval-every`` steps (not in
the wall time). Step time = slowest rank. Breakdown per step (mean over steps after
warm-up; exchange phases per rank): attention, dense FFN or experts, router + permute,
dispatch/combine (the fastest rank's exchange time: the transfer), count exchange,
imbalance wait (mean over ranks of each exchange's time minus the fastest rank's), rest
(embeddings, head, loss, optimizer, gradient sync), drops. Equal wall time: every model's
validation loss at the shortest model's total training time (linear interpolation).

Cluster prediction (``benchmarks/cluster_model.py``'s alpha-beta links): the measured
expert load shape and k, a cluster-size layer (``--cluster-*``), per GPU per layer:
attention + FFN GEMMs at ``--gpu-tflops``, the MoE's all-to-all (flat and hierarchical, the
faster), the busiest GPU's expert rows; decode steps add weight reads at ``--hbm-GBps``.
Break-even: MoE wins where its step costs less than ``S / s*`` times dense's, ``s*`` = the
step at which the MoE first reached the dense model's final validation loss.

    nice -n 10 python benchmarks/moe_vs_dense.py --wide                   # EP 2 and 4
    python benchmarks/moe_vs_dense.py --tiny --out /tmp/mvd.json           # smoke size (tests)
    python benchmarks/moe_vs_dense.py --replot benchmarks/results/moe_vs_dense.json  # PNG from JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._common import ModuleClock, environment, median, save_plot, spawn, write_report  # noqa: E402
from benchmarks.cluster_model import Links, exchange_time, expert_shares  # noqa: E402

EXCHANGES = ("count_exchange", "dispatch_a2a", "combine_a2a")
BREAKDOWN = ("attention", "ffn", "router_permute", "dispatch_combine", "count_exchange", "imbalance_wait", "rest")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep-sizes", default="2,4")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--warmup-steps-excluded", type=int, default=5, help="steps left out of the breakdown")
    p.add_argument("--wide", action="store_true", help="also the MoE with E x the FFN parameters (top-1)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=1234)
    # the cluster-size layer the prediction is made for
    p.add_argument("--cluster-gpus", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--cluster-hidden", type=int, default=4096)
    p.add_argument("--cluster-seq", type=int, default=4096)
    p.add_argument("--cluster-tokens", type=int, default=4096, help="training tokens per GPU per step")
    p.add_argument("--cluster-decode-tokens", type=int, default=8, help="decode tokens per GPU per step")
    p.add_argument("--cluster-experts", type=int, default=64, help="experts (at least one per GPU)")
    p.add_argument("--gpu-tflops", type=float, default=400.0)
    p.add_argument("--hbm-GBps", type=float, default=3000.0)
    p.add_argument("--tiny", action="store_true", help="smoke size")
    p.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    a = p.parse_args(argv)
    if a.tiny:
        a.ep_sizes, a.steps, a.eval_every, a.eval_batches, a.warmup_steps_excluded = "2", 4, 2, 1, 1
        a.d_model, a.n_layers, a.seq_len, a.global_batch_size, a.num_experts = 32, 2, 32, 4, 4
        a.expert_ffn, a.dtype, a.cluster_gpus = 32, "fp32", "8,64"
    return a


def model_specs(a: argparse.Namespace) -> dict[str, dict]:
    """Flat launcher options per model (``config_from`` keys)."""
    moe = dict(num_experts=a.num_experts, activation="gelu", capacity_factor=a.capacity_factor)
    specs = {
        "dense": dict(moe_every=0, dense_ffn_hidden=a.top_k * a.expert_ffn, top_k=a.top_k,
                      expert_ffn_hidden=a.expert_ffn, **moe),
        "moe": dict(moe_every=1, top_k=a.top_k, expert_ffn_hidden=a.expert_ffn, **moe),
    }
    if a.wide:
        specs["moe_wide"] = dict(moe_every=1, top_k=1, router="switch", expert_ffn_hidden=a.top_k * a.expert_ffn, **moe)
    return specs


def ffn_params(a: argparse.Namespace, name: str) -> dict:
    """FFN parameters per layer: total and active per token (router excluded)."""
    d = a.d_model
    if name == "dense":
        n = 2 * d * a.top_k * a.expert_ffn
        return {"total": n, "active": n}
    k, f = (1, a.top_k * a.expert_ffn) if name == "moe_wide" else (a.top_k, a.expert_ffn)
    return {"total": a.num_experts * 2 * d * f, "active": k * 2 * d * f}


def _seconds(clock: ModuleClock) -> float:
    """Forward + backward seconds of ``clock``'s modules since the last take."""
    forward_s, backward_s = clock.take()
    return sum(forward_s) + backward_s


def _worker(rank: int, world: int, a: argparse.Namespace, specs: dict[str, dict]) -> dict:
    from expert_parallel.distributed.groups import ParallelGroups
    from expert_parallel.models.transformer import DenseFFN
    from expert_parallel.training.options import config_from
    from expert_parallel.training.trainer import Trainer

    groups = ParallelGroups.build(world)
    trainers, clocks = {}, {}
    tmp = tempfile.mkdtemp(prefix=f"mvd_r{rank}_")
    for name, spec in specs.items():
        cfg = config_from(d_model=a.d_model, n_layers=a.n_layers, seq_len=a.seq_len,
                          global_batch_size=a.global_batch_size, max_steps=a.steps, eval_every=a.eval_every,
                          eval_batches=a.eval_batches, dtype=a.dtype, seed=a.seed, tensorboard=False,
                          out=os.path.join(tmp, name), **spec).with_parallel(world, world)
        tr = Trainer(cfg, groups, torch.device("cpu"))
        trainers[name] = tr
        clocks[name] = (ModuleClock([b.attn for b in tr.model.layers], backward=True),
                        ModuleClock([b.ffn for b in tr.model.layers if isinstance(b.ffn, DenseFFN)], backward=True))
    out = {name: {"steps": [], "val": [], "precision": tr.precision.name, "dispatcher": tr.dispatch}
           for name, tr in trainers.items()}
    routed: dict[str, list[float]] = {}
    names = list(trainers)
    for name in names:
        out[name]["val"].append({"step": 0, "train_s": 0.0, "val_loss": trainers[name].evaluate()})
    elapsed = {n: 0.0 for n in names}
    for step in range(a.steps):
        rot = step % len(names)
        for name in names[rot:] + names[:rot]:
            tr, (attn, ffn) = trainers[name], clocks[name]
            dist.barrier()
            tr.timer.collect()
            attn.take(), ffn.take()
            t0 = time.perf_counter()
            res = tr.train_step()
            dt = time.perf_counter() - t0
            tr.step += 1
            phases = tr.timer.collect()
            t = torch.tensor([dt], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed[name] += float(t)
            routed_kept = [0.0, 0.0]
            for lname, s in res.stats.items():
                r = s.routed_E.double()
                routed[lname + "@" + name] = [x + y for x, y in zip(routed.get(lname + "@" + name, [0.0] * len(r)),
                                                                    r.tolist())]
                routed_kept[0] += float(r.sum())
                routed_kept[1] += float(s.kept_E.double().sum())
            out[name]["steps"].append({
                "step_s": dt, "slowest_step_s": float(t), "loss": res.loss, "phases": phases,
                "attention_s": _seconds(attn), "dense_ffn_s": _seconds(ffn),
                "drop_fraction": 1.0 - routed_kept[1] / routed_kept[0] if routed_kept[0] else 0.0})
            if tr.step % a.eval_every == 0 or tr.step == a.steps:
                out[name]["val"].append({"step": tr.step, "train_s": elapsed[name], "val_loss": tr.evaluate()})
    for name in names:
        per_expert = [v for k, v in routed.items() if k.endswith("@" + name)]
        out[name]["routed_E"] = [sum(col) for col in zip(*per_expert)] if per_expert else []
    return out


def _phase(ph: dict, name: str) -> float:
    return ph.get(name, 0.0) + ph.get(name + ".bwd", 0.0)


def breakdown(per_rank: list[dict], skip: int) -> dict:
    """Mean seconds per step by :data:`BREAKDOWN` group (see the module docstring)."""
    n_steps = len(per_rank[0]["steps"])
    acc = {k: 0.0 for k in BREAKDOWN}
    used = list(range(min(skip, n_steps - 1), n_steps))
    for s in used:
        ranks = [r["steps"][s] for r in per_rank]
        slow = ranks[0]["slowest_step_s"]
        ex = {p: [_phase(r["phases"], p) for r in ranks] for p in EXCHANGES}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        parts = {
            "attention": mean([r["attention_s"] for r in ranks]),
            "ffn": mean([r["dense_ffn_s"] + _phase(r["phases"], "experts") + _phase(r["phases"], "shared_expert")
                         for r in ranks]),
            "router_permute": mean([sum(_phase(r["phases"], p) for p in ("router", "permute", "unpermute", "stats"))
                                    for r in ranks]),
            "dispatch_combine": min(ex["dispatch_a2a"]) + min(ex["combine_a2a"]),
            "count_exchange": min(ex["count_exchange"]),
            "imbalance_wait": sum(mean(v) - min(v) for v in ex.values()),
        }
        parts["rest"] = max(0.0, slow - sum(parts.values()))
        for k, v in parts.items():
            acc[k] += v
    return {k: v / len(used) for k, v in acc.items()}


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of (x, y) points (sorted by x) at ``x`` (clamped)."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def first_step_reaching(val: list[dict], loss: float) -> float | None:
    """Interpolated step at which a validation curve first reaches ``loss`` (None: never)."""
    for p, q in zip(val, val[1:]):
        if q["val_loss"] <= loss:
            if p["val_loss"] <= loss:
                return float(p["step"])
            return p["step"] + (q["step"] - p["step"]) * (p["val_loss"] - loss) / (p["val_loss"] - q["val_loss"])
    return None


def cluster_prediction(a: argparse.Namespace, load_shape: list[float], top_k: int) -> list[dict]:
    """Predicted per-layer time of the MoE (k experts of F/k) and of the dense layer (FFN F)
    at each GPU count, training and decode (see the module docstring)."""
    D, S, F = a.cluster_hidden, a.cluster_seq, 4 * a.cluster_hidden
    Fe = F // top_k
    links = Links()
    fl = a.gpu_tflops * 1e12
    rows = []
    for tokens, phase in ((a.cluster_tokens, "train"), (a.cluster_decode_tokens, "decode")):
        # Training: forward + backward (3 GEMM passes) over causal attention (mean context
        # S/2); decode: one forward per sequence over S cached positions, which it reads.
        passes, ctx = (3, S / 2) if phase == "train" else (1, S)
        attn_flop = passes * (2 * tokens * 4 * D * D + 2 * 2 * tokens * ctx * D)
        attn_bytes = 4 * D * D * 2 + (tokens * ctx * 2 * D * 2 if phase == "decode" else 0)
        dense_flop = passes * 2 * tokens * 2 * D * F
        dense_bytes = 2 * D * F * 2
        for n in (int(v) for v in a.cluster_gpus.split(",")):
            if n < links.gpus_per_node or n % links.gpus_per_node:
                continue
            E = max(a.cluster_experts, n)
            shares = expert_shares(load_shape, E, a.seed)
            per_gpu = E // n
            gpu_share = [sum(shares[g * per_gpu:(g + 1) * per_gpu]) for g in range(n)]
            rows_max = max(gpu_share) * n * tokens * top_k
            expert_flop = passes * 2 * rows_max * 2 * D * Fe
            touched = min(per_gpu, rows_max)  # local experts with at least one row (decode)
            expert_bytes = touched * 2 * D * Fe * 2
            router_flop = passes * 2 * tokens * D * E
            best = None
            for alg in ("flat", "hierarchical"):
                disp = exchange_time(n, links, gpu_share, tokens, top_k, D * 2.0, alg, alg == "hierarchical")
                comb = exchange_time(n, links, gpu_share, tokens, top_k, D * 2.0, alg, alg == "hierarchical")
                t = (disp["seconds"] + comb["seconds"]) * (2 if phase == "train" else 1)
                if best is None or t < best[1]:
                    best = (alg, t)

            def cost(flop: float, nbytes: float) -> float:
                return max(flop / fl, nbytes / (a.hbm_GBps * 1e9))

            attn = cost(attn_flop, attn_bytes)
            dense = attn + cost(dense_flop, dense_bytes)
            moe = attn + cost(expert_flop + router_flop, expert_bytes) + best[1]
            rows.append({"phase": phase, "gpus": n, "experts": E, "tokens_per_gpu": tokens, "exchange": best[0],
                         "attention_ms": 1e3 * attn, "dense_layer_ms": 1e3 * dense, "moe_layer_ms": 1e3 * moe,
                         "a2a_ms": 1e3 * best[1], "gpu_load_max_over_mean": max(gpu_share) * n,
                         "moe_over_dense": moe / dense})
    return rows


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    specs = model_specs(a)
    runs = {}
    for ep in (int(v) for v in a.ep_sizes.split(",")):
        t0 = time.perf_counter()
        per_rank = spawn(_worker, ep, a, specs, threads=1, timeout=6 * 3600)
        runs[ep] = per_rank
        print(f"EP={ep}: {len(specs)} models x {a.steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    tokens_per_step = a.global_batch_size * a.seq_len
    results = []
    for ep, per_rank in runs.items():
        for name in specs:
            ranks = [r[name] for r in per_rank]
            steps = ranks[0]["steps"]
            slow = [s["slowest_step_s"] for s in steps]
            total = sum(slow)
            used = slow[min(a.warmup_steps_excluded, len(slow) - 1):]
            results.append({
                "ep": ep, "model": name, "ffn_params_per_layer": ffn_params(a, name), "precision": ranks[0]["precision"],
                "dispatcher": ranks[0]["dispatcher"], "steps": len(steps), "train_s": total,
                "step_ms_median": 1e3 * median(used), "step_ms_mean": 1e3 * sum(used) / len(used),
                "tokens_per_s": tokens_per_step * len(used) / sum(used),
                "breakdown_ms": {k: 1e3 * v for k, v in breakdown(ranks, a.warmup_steps_excluded).items()},
                "drop_fraction": sum(s["drop_fraction"] for s in steps) / len(steps),
                "val": ranks[0]["val"], "train_loss": [s["loss"] for s in steps],
                "final_val_loss": ranks[0]["val"][-1]["val_loss"], "routed_E": ranks[0]["routed_E"]})
    answer = {}
    for ep in runs:
        rs = {r["model"]: r for r in results if r["ep"] == ep}
        t_eq = min(r["train_s"] for r in rs.values())
        for r in rs.values():
            r["val_loss_at_equal_time"] = _interp([(v["train_s"], v["val_loss"]) for v in r["val"]], t_eq)
            r["equal_time_s"] = t_eq
        dense = rs["dense"]
        for name, r in rs.items():
            if name == "dense":
                continue
            s_star = first_step_reaching(r["val"], dense["final_val_loss"])
            r["step_time_ratio_vs_dense"] = r["step_ms_median"] / dense["step_ms_median"]
            r["steps_to_dense_final_loss"] = s_star
            r["break_even_step_time_ratio"] = (a.steps / s_star) if s_star else None
            answer[f"ep{ep}_{name}"] = {
                "val_loss_equal_steps": (r["final_val_loss"], dense["final_val_loss"]),
                "val_loss_equal_time": (r["val_loss_at_equal_time"], dense["val_loss_at_equal_time"]),
                "step_time_ratio": r["step_time_ratio_vs_dense"],
                "break_even_ratio": r["break_even_step_time_ratio"],
                "wins_at_equal_steps": r["final_val_loss"] < dense["final_val_loss"],
                "wins_at_equal_time": r["val_loss_at_equal_time"] < dense["val_loss_at_equal_time"]}
    # Cluster prediction from the MoE's measured routing (EP=2 run: the model is the same at every EP).
    moe_runs = [r for r in results if r["model"] == "moe" and r["routed_E"]]
    routed = moe_runs[0]["routed_E"] if moe_runs else [1.0]
    shape = sorted((x / sum(routed) for x in routed), reverse=True)
    cluster = cluster_prediction(a, shape, a.top_k)
    moe0 = moe_runs[0] if moe_runs else None
    be = moe0.get("break_even_step_time_ratio") if moe0 else None
    for row in cluster:
        row["moe_wins_training"] = None if be is None or row["phase"] != "train" else row["moe_over_dense"] < be
    sentence = _sentence(results, cluster, be, a)
    report = {"benchmark": "moe_vs_dense", "config": vars(a), **environment(), "models": specs,
              "results": results, "answer": answer, "cluster_prediction": cluster,
              "measured_load_shape": shape, "break_even_step_time_ratio": be, "sentence": sentence}
    md = _markdown(a, results, cluster, shape, be, sentence)

    write_report(a.out, report, md, lambda plt: plot(plt, results, cluster, be))
    print("\n".join(md), flush=True)
    return report


def plot(plt, results: list[dict], cluster: list[dict], be: float | None) -> None:
    """Loss against wall time per EP size, and the cluster prediction (``--replot``
    redraws it from a report's JSON)."""
    eps = sorted({r["ep"] for r in results})
    fig, axes = plt.subplots(1, len(eps) + 1, figsize=(6 * (len(eps) + 1), 4.2))
    for ax, ep in zip(axes, eps):
        for r in (r for r in results if r["ep"] == ep):
            ax.plot([v["train_s"] for v in r["val"]], [v["val_loss"] for v in r["val"]], marker="o", ms=3,
                    label=f"{r['model']} ({r['step_ms_median']:.0f} ms/step)")
        ax.set(title=f"EP={ep}: validation loss vs training wall time", xlabel="s (slowest rank, no eval)",
               ylabel="val loss (nats/byte)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for phase, style in (("train", "-"), ("decode", "--")):
        pts = [c for c in cluster if c["phase"] == phase]
        ax.plot([c["gpus"] for c in pts], [c["moe_over_dense"] for c in pts], style, marker="o",
                label=f"{phase} ({pts[0]['tokens_per_gpu'] if pts else '?'} tok/GPU)")
    if be:
        ax.axhline(be, color="0.4", ls=":", label=f"break-even {be:.2f}x (measured loss gain)")
    ax.axhline(1.0, color="0.8")
    ax.set_xscale("log", base=2)
    ax.set(title="predicted MoE / dense layer time (NVLink + IB)", xlabel="GPUs (EP size)", ylabel="ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()


def _sentence(results: list[dict], cluster: list[dict], be: float | None, a: argparse.Namespace) -> str:
    moe = [r for r in results if r["model"] == "moe"]
    dense = {r["ep"]: r for r in results if r["model"] == "dense"}
    if not moe:
        return "no MoE run"
    ratios = ", ".join(f"{r['step_time_ratio_vs_dense']:.2f}x at EP={r['ep']}" for r in moe)
    eq_time = all(r["val_loss_at_equal_time"] < dense[r["ep"]]["val_loss_at_equal_time"] for r in moe)
    eq_steps = all(r["final_val_loss"] < dense[r["ep"]]["final_val_loss"] for r in moe)
    train = [c for c in cluster if c["phase"] == "train"]
    dec = [c for c in cluster if c["phase"] == "decode"]
    wins = [c["gpus"] for c in train if be and c["moe_over_dense"] < be]
    where = (f"up to {max(wins)} GPUs" if wins and len(wins) < len(train) else
             "at every size from 8 to 1,024 GPUs" if wins else "at no cluster size modelled")
    be_text = f"{be:.2f}x" if be else "n/a"
    return (f"With the dense model's active parameters, the MoE (E={a.num_experts}, k={a.top_k}) reaches a "
            f"{'lower' if eq_steps else 'higher'} loss at equal steps and {'wins' if eq_time else 'loses'} at equal "
            f"wall time on this 2-core CPU (its step costs {ratios}, break-even {be_text}); on an NVLink/IB "
            f"cluster the model predicts it wins in training {where} "
            f"({train[0]['moe_over_dense']:.2f}x at {train[0]['gpus']} to {train[-1]['moe_over_dense']:.2f}x at "
            f"{train[-1]['gpus']} GPUs); in small-batch decoding ({dec[0]['tokens_per_gpu']} tokens/GPU) a layer is "
            f"{min(c['moe_over_dense'] for c in dec):.2f}-{max(c['moe_over_dense'] for c in dec):.2f}x the dense one.") \
        if train and dec else "no cluster rows"


def _markdown(a, results, cluster, shape, be, sentence) -> list[str]:
    md = [f"# MoE vs dense at equal active parameters (launcher model D={a.d_model}, {a.n_layers} layers, seq "
          f"{a.seq_len}, {a.global_batch_size} seqs/step, built-in corpus, {a.steps} steps)", "", f"**{sentence}**", "",
          "| EP | model | FFN params/layer (total / active) | tok/s | step ms (median) | step ms (mean) | attention | FFN or experts | "
          "router+permute | dispatch/combine | count x | imbalance wait | rest | drop % | val loss @ equal steps | "
          "val loss @ equal time |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, p = r["breakdown_ms"], r["ffn_params_per_layer"]
        md.append(f"| {r['ep']} | {r['model']} | {p['total'] / 1e3:.0f}k / {p['active'] / 1e3:.0f}k | "
                  f"{r['tokens_per_s']:.0f} | {r['step_ms_median']:.1f} | {r['step_ms_mean']:.1f} | "
                  + " | ".join(f"{b[k]:.1f}" for k in BREAKDOWN)
                  + f" | {100 * r['drop_fraction']:.1f} | {r['final_val_loss']:.4f} | {r['val_loss_at_equal_time']:.4f} |")
    md += ["", "Breakdown columns are ms per step (mean after warm-up; exchanges: the fastest rank's time, "
           "the rest of each rank's exchange time is imbalance wait). Equal time = the shortest model's total "
           "training time at that EP size.", ""]
    for r in results:
        if r["model"] != "dense":
            s = r["steps_to_dense_final_loss"]
            md.append(f"- EP={r['ep']} {r['model']}: step time {r['step_time_ratio_vs_dense']:.2f}x dense; reached "
                      f"dense's final val loss at step {s:.0f} of {a.steps}" if s else
                      f"- EP={r['ep']} {r['model']}: step time {r['step_time_ratio_vs_dense']:.2f}x dense; never "
                      "reached dense's final val loss")
    md += ["", f"## Predicted MoE / dense layer time on a cluster (D={a.cluster_hidden}, dense FFN "
           f"{4 * a.cluster_hidden}, MoE k={a.top_k} of FFN {4 * a.cluster_hidden // a.top_k}, measured load shape "
           f"max/mean {max(shape) * len(shape):.2f}, {a.gpu_tflops:g} TFLOP/s, HBM {a.hbm_GBps:g} GB/s; "
           "links as `cluster_model.py`: 8 GPUs/node NVLink 160 GB/s, IB 50 GB/s)", "",
           f"Break-even from the measured loss gain: {be:.2f}x" if be else "Break-even: n/a (MoE never reached "
           "dense's final loss)", "",
           "| phase | GPUs | E | tokens/GPU | exchange | attention ms | dense layer ms | MoE layer ms | a2a ms | "
           "MoE/dense | MoE wins |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for c in cluster:
        win = "" if c["moe_wins_training"] is None else ("yes" if c["moe_wins_training"] else "no")
        md.append(f"| {c['phase']} | {c['gpus']} | {c['experts']} | {c['tokens_per_gpu']} | {c['exchange']} | "
                  f"{c['attention_ms']:.3f} | {c['dense_layer_ms']:.3f} | {c['moe_layer_ms']:.3f} | {c['a2a_ms']:.3f} | "
                  f"{c['moe_over_dense']:.2f} | {win} |")
    md += ["", f"Load average at the end: {environment()['hardware'].get('load_average_1_5_15')} (a shared 2-core "
           "machine; models interleaved step by step, so drift hits all alike)."]
    return md


def replot(path: str) -> str:
    """Redraw ``<stem>.png`` from a report's JSON (the measurements unchanged)."""
    import json

    with open(path) as fh:
        r = json.load(fh)
    png = os.path.splitext(path)[0] + ".png"
    save_plot(png, lambda plt: plot(plt, r["results"], r["cluster_prediction"], r["break_even_step_time_ratio"]))
    return png


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        print(replot(sys.argv[2]))
    else:
        main()
