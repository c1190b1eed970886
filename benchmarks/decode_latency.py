"""Decode latency: per-token time of KV-cache generation, per dispatch mode, MoE vs dense.

Question: at chat-style decode batches (1 to 64 sequences per rank) how long does one
generated token take, how much of it is each MoE layer, and where does that time go
(router, count exchange, dispatch, experts, combine)? Which dispatch mode is best for
small batches, and up to which batch does the all-gather dispatcher beat the flat
all-to-all (the crossover that ``a2a_algorithm="auto"`` and the default of
``MoEConfig.allgather_max_tokens`` use)?

Method: ``EP`` gloo ranks (one intra-op thread each) build the launcher's transformer
(``ModelConfig`` defaults: D=128, 4 layers, E=8, k=2, expert F=256 GELU; the dense model
has the same active parameters, FFN 2 x 256) once per dispatch mode, set up for inference
as ``launch/generate.py`` does (dropless; static shapes with eval capacity factor 2.0).
Each rank decodes its own ``B`` sequences: a prompt of ``--prompt-len`` bytes from the
built-in corpus (prefill, not timed), then ``--new-tokens`` greedy tokens one position at
a time through the KV cache. Per decode step every rank records its step time, each MoE
layer's forward time (module hooks) and the layer's phases (``PhaseTimer``). Per step, the
token latency is the slowest rank's step (a token is ready when every rank is); an MoE
layer's latency is the shortest of the ranks' layer times, i.e. about the time of the rank
that entered it last, which waits for no peer to arrive: the skew the attention and the
scheduler leave between ranks is not charged to the layer (the slowest rank's layer time
is reported beside it). Every point keeps its
own KV cache, and all points advance one token at a time in rotating order (``--rounds``
times, each with fresh prompts), so load bursts on the shared machine hit all alike.
Reported: medians over steps and rounds; the phase breakdown is the mean per layer.

Modes: flat all-to-all, overlap (2 chunks), static shapes (padded, no host sync),
allgather (padded to exactly B tokens per rank: its best case), auto (allgather up to the
configured ``allgather_max_tokens``, flat above), and at EP=4 hierarchical (two emulated
nodes of 2 ranks). The crossover sweep sets allgather against flat at more batch sizes.

    nice -n 10 python benchmarks/decode_latency.py                   # EP 2 and 4, full sweep
    python benchmarks/decode_latency.py --tiny --out /tmp/dl.json     # smoke size (tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks._common import ModuleClock, environment, median, precisions, spawn, write_report  # noqa: E402
from expert_parallel import MoEConfig  # noqa: E402

BREAKDOWN = ("router", "count_exchange", "dispatch_a2a", "experts", "combine_a2a", "other")
"""Per-layer phases reported; ``other`` = permute + unpermute + stats + the layer's time
outside every phase (Python glue)."""
MODES = {
    "flat": {},
    "overlap": {"overlap_chunks": 2},
    "static": {"static_shapes": True},
    "allgather": {"a2a_algorithm": "allgather"},
    "auto": {"a2a_algorithm": "auto"},
    "hierarchical": {"a2a_algorithm": "hierarchical"},
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep-sizes", default="2,4")
    p.add_argument("--batches", default="1,8,64", help="sequences per rank (main table)")
    p.add_argument("--crossover-batches", default="1,2,4,8,16,32,64,128,256,512,1024",
                   help="sequences per rank where allgather is set against flat")
    p.add_argument("--crossover-margin", type=float, default=0.02,
                   help="allgather must be faster than flat by more than this fraction (a tie is no win)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    p.add_argument("--tiny", action="store_true", help="smoke size")
    p.add_argument("--out", default="benchmarks/results/decode_latency.json")
    a = p.parse_args(argv)
    if a.tiny:
        a.ep_sizes, a.batches, a.crossover_batches = "2", "1,4", "1,4"
        a.prompt_len, a.new_tokens, a.rounds, a.d_model, a.n_layers, a.expert_ffn = 4, 3, 1, 32, 2, 32
        a.num_experts = 4
    return a


def _model_cfg(a: argparse.Namespace, kind: str):
    from expert_parallel.models.transformer import ModelConfig

    moe = MoEConfig(hidden_size=a.d_model, ffn_hidden_size=a.expert_ffn, num_experts=a.num_experts,
                    top_k=a.top_k, activation="gelu", capacity_factor=1.25, eval_capacity_factor=2.0)
    return ModelConfig(d_model=a.d_model, n_layers=a.n_layers, n_heads=4 if a.d_model % 4 == 0 else 1,
                       seq_len=a.prompt_len + a.new_tokens + 1, moe=moe,  # KV cache for 1024 seqs fits
                       moe_every=0 if kind == "dense" else 1, dense_ffn_hidden=a.top_k * a.expert_ffn)


def _points(a: argparse.Namespace, ep: int) -> list[dict]:
    """(model, mode, batch) points of one EP size; ``max_tokens`` for allgather = batch."""
    modes = [m for m in a.modes.split(",") if m and (m != "hierarchical" or ep >= 4)]
    batches = [int(b) for b in a.batches.split(",")]
    cross = [int(b) for b in a.crossover_batches.split(",")]
    pts = [{"model": "dense", "mode": "-", "batch": b, "section": "main"} for b in batches]
    pts += [{"model": "moe", "mode": m, "batch": b, "section": "main"} for m in modes for b in batches]
    have = {(p["mode"], p["batch"]) for p in pts}
    for b in cross:
        for m in ("flat", "allgather"):
            if (m, b) not in have:
                pts.append({"model": "moe", "mode": m, "batch": b, "section": "crossover"})
    return pts


def _worker(rank: int, world: int, a: argparse.Namespace, points: list[dict]) -> list[dict]:
    from expert_parallel.distributed.groups import ParallelGroups
    from expert_parallel.inference.loader import build_model
    from expert_parallel.models.generation import sample
    from expert_parallel.models.transformer import DenseFFN, KVCache
    from expert_parallel.profiling.timer import PhaseTimer
    from expert_parallel.training.data import load_builtin_corpus

    groups = ParallelGroups.build(world)
    hier = ParallelGroups.build(world, ranks_per_node=2) if world >= 4 else None
    prec = precisions(a.dtype)[0]
    corpus = load_builtin_corpus().val
    models: dict = {}

    def model_for(pt: dict):
        # allgather and auto keep a history (the last gathered size): one model per batch,
        # or the points of different batches, advancing in turn, would resize every step.
        key = (pt["model"], pt["mode"], pt["batch"] if pt["mode"] in ("allgather", "auto") else None)
        if key not in models:
            cfg = _model_cfg(a, pt["model"])
            over = dict(MODES.get(pt["mode"], {}))
            if pt["mode"] == "allgather":
                over["allgather_max_tokens"] = pt["batch"]
            g = hier if pt["mode"] == "hierarchical" else groups
            m = build_model(cfg, g, "cpu", seed=0, moe_overrides=over if pt["model"] == "moe" else None)
            timer = PhaseTimer("cpu")
            for layer in m.moe_layers().values():
                layer.set_timer(timer)
            ffn = [b.ffn for b in m.layers if isinstance(b.ffn, DenseFFN)]
            clock = ModuleClock(list(m.moe_layers().values()) or ffn)
            models[key] = (m, timer, clock)
        return models[key]

    gen = torch.Generator().manual_seed(1000 + rank)
    results = [{"steps": [], "layer": [], "phases": [], "drop": []} for _ in points]
    for rnd in range(a.rounds):
        # Prefill every point (not timed), then advance all of them one token at a time in
        # rotating order: load bursts on the shared machine hit every point alike.
        live = []
        for i, pt in enumerate(points):
            model, timer, clock = model_for(pt)
            b = pt["batch"]
            starts = torch.randint(0, len(corpus) - a.prompt_len, (b,), generator=gen).tolist()
            prompt = torch.tensor([list(corpus[s:s + a.prompt_len]) for s in starts], dtype=torch.long)
            cache = KVCache.empty(model.cfg, b)
            with torch.no_grad(), prec.autocast("cpu"):
                out = model(prompt, cache=cache)
            live.append([i, cache, sample(out.logits[:, -1], 0.0, None, None).unsqueeze(1)])
        for step in range(a.new_tokens):
            rot = (step + rnd) % len(live)
            for item in live[rot:] + live[:rot]:
                i, cache, tok = item
                model, timer, clock = model_for(points[i])
                timer.collect()
                clock.take()
                dist.barrier()
                with torch.no_grad(), prec.autocast("cpu"):
                    t0 = time.perf_counter()
                    out = model(tok, cache=cache)
                    item[2] = sample(out.logits[:, -1], 0.0, None, None).unsqueeze(1)
                    dt = time.perf_counter() - t0
                layers = clock.take()[0]
                phases = timer.collect()
                n = max(1, len(layers))
                per = {p: phases.get(p, 0.0) / n for p in ("router", "count_exchange", "dispatch_a2a",
                                                             "experts", "combine_a2a")}
                per["other"] = max(0.0, sum(layers) / n - sum(per.values()))
                res = results[i]
                res["steps"].append(dt)
                res["layer"].append(sum(layers) / n)
                res["phases"].append(per)
                if out.stats:
                    routed = sum(float(s.routed_E.sum()) for s in out.stats.values())
                    kept = sum(float(s.kept_E.sum()) for s in out.stats.values())
                    res["drop"].append(1.0 - kept / routed if routed else 0.0)
    describe = {}
    for key, (m, _, _) in models.items():
        layer = next(iter(m.moe_layers().values()), None)
        describe[str(key)] = layer.dispatcher.describe() if layer is not None else "dense"
    return [{"results": results, "dispatchers": describe}]


def _summarize(point: dict, per_rank: list[dict]) -> dict:
    steps = [max(vals) for vals in zip(*(r["steps"] for r in per_rank))]
    # A layer's own latency: the time of the rank that entered it last (it waits for no
    # peer to arrive; the others' extra time is the skew the step before left behind).
    layer = [min(vals) for vals in zip(*(r["layer"] for r in per_rank))]
    layer_slowest = [max(vals) for vals in zip(*(r["layer"] for r in per_rank))]
    phases = {p: sum(ph[p] for r in per_rank for ph in r["phases"]) / sum(len(r["phases"]) for r in per_rank)
              for p in BREAKDOWN}
    drops = [d for r in per_rank for d in r["drop"]]
    return {**point, "token_ms": 1e3 * median(steps), "layer_ms": 1e3 * median(layer),
            "layer_ms_slowest_rank": 1e3 * median(layer_slowest),
            "phases_ms": {p: 1e3 * v for p, v in phases.items()},
            "drop_fraction": sum(drops) / len(drops) if drops else 0.0, "samples": len(steps)}


def crossover(rows: list[dict], ep: int, margin: float = 0.0) -> tuple[int, bool]:
    """Largest batch (tokens per rank) up to which allgather's MoE-layer latency is below
    flat's by more than ``margin`` (a fraction) at every swept batch; ``True`` when it won
    at every batch swept."""
    pairs = {}
    for r in rows:
        if r["ep"] == ep and r["model"] == "moe" and r["mode"] in ("flat", "allgather"):
            pairs.setdefault(r["batch"], {})[r["mode"]] = r["layer_ms"]
    best, all_won = 0, True
    for b in sorted(pairs):
        if "flat" not in pairs[b] or "allgather" not in pairs[b]:
            continue
        if pairs[b]["allgather"] * (1.0 + margin) < pairs[b]["flat"]:
            best = b
        else:
            all_won = False
            break
    return best, all_won


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    rows, dispatchers = [], {}
    for ep in (int(v) for v in a.ep_sizes.split(",")):
        points = _points(a, ep)
        t0 = time.perf_counter()
        out = spawn(_worker, ep, a, points, threads=1)
        dispatchers[str(ep)] = out[0][0]["dispatchers"]
        for i, pt in enumerate(points):
            rows.append({"ep": ep, **_summarize(pt, [o[0]["results"][i] for o in out])})
        print(f"EP={ep}: {len(points)} points in {time.perf_counter() - t0:.0f}s", flush=True)
    eps = sorted({r["ep"] for r in rows})
    cross = {str(ep): crossover(rows, ep, a.crossover_margin) for ep in eps}
    chosen = min(c[0] for c in cross.values()) if cross else 0
    target = {}
    for ep in eps:
        for b in (x for x in (int(v) for v in a.batches.split(",")) if x <= 8):
            main_rows = [r for r in rows if r["ep"] == ep and r["batch"] == b and r["model"] == "moe"
                         and r["section"] == "main"]
            flat = next((r for r in main_rows if r["mode"] == "flat"), None)
            if not flat or not main_rows:
                continue
            best = min(main_rows, key=lambda r: r["layer_ms"])
            target[f"ep{ep}_batch{b}"] = {"best_mode": best["mode"], "best_layer_ms": best["layer_ms"],
                                          "flat_layer_ms": flat["layer_ms"],
                                          "flat_over_best": flat["layer_ms"] / best["layer_ms"],
                                          "met": flat["layer_ms"] / best["layer_ms"] >= 1.3}
    report = {"benchmark": "decode_latency", "config": vars(a), **environment(), "rows": rows,
              "dispatchers": dispatchers,
              "crossover_tokens_per_rank": {ep: {"batch": c[0], "allgather_won_every_batch_swept": c[1]}
                                            for ep, c in cross.items()},
              "crossover": chosen,
              "allgather_max_tokens_default": MoEConfig(hidden_size=8, ffn_hidden_size=8,
                                                        num_experts=2).allgather_max_tokens,
              "target": "at batch 1-8 per rank the best mode's per-token MoE-layer latency is >= 1.3x "
                        "lower than flat's", "target_check": target}
    md = [f"# Decode latency per token (KV cache, greedy; D={a.d_model}, {a.n_layers} layers, E={a.num_experts}, "
          f"k={a.top_k}, expert F={a.expert_ffn} GELU; dense FFN {a.top_k * a.expert_ffn}; {a.dtype}; "
          "gloo, 1 thread/rank)", "",
          "Per-token ms = one decode step of the whole model (slowest rank, median); MoE layer ms = one "
          "MoE layer's forward (dense: one dense FFN), the shortest rank time (~ the rank that entered "
          "last; median; the slowest rank's is in the JSON); the breakdown is per layer (mean): router, count "
          "exchange (incl. the host read), dispatch, experts, combine, other (permute, unpermute, stats, "
          "glue).", "",
          "| EP | batch/rank | model | mode | token ms | layer ms | router | count x | dispatch | experts | "
          "combine | other | vs flat | drop % |",
          "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["section"] == "main"), key=lambda r: (r["ep"], r["batch"], r["model"])):
        flat = next((q for q in rows if q["ep"] == r["ep"] and q["batch"] == r["batch"] and q["mode"] == "flat"), None)
        vs = f"{flat['layer_ms'] / r['layer_ms']:.2f}x" if flat and r["model"] == "moe" else ""
        ph = r["phases_ms"]
        cells = " | ".join(f"{ph[p]:.3f}" for p in BREAKDOWN) if r["model"] == "moe" else " | ".join([""] * 6)
        md.append(f"| {r['ep']} | {r['batch']} | {r['model']} | {r['mode']} | {r['token_ms']:.2f} | "
                  f"{r['layer_ms']:.3f} | {cells} | {vs} | {100 * r['drop_fraction']:.1f} |")
    md += ["", "'vs flat' = flat's MoE-layer ms / this mode's (higher is faster).", "",
           "## Crossover: allgather vs flat (MoE layer ms per token)", "",
           "| EP | batch/rank | flat | allgather | flat / allgather |", "|---:|---:|---:|---:|---:|"]
    for ep in eps:
        for b in sorted({r["batch"] for r in rows if r["ep"] == ep}):
            f = next((r for r in rows if r["ep"] == ep and r["batch"] == b and r["mode"] == "flat"), None)
            g = next((r for r in rows if r["ep"] == ep and r["batch"] == b and r["mode"] == "allgather"), None)
            if f and g:
                md.append(f"| {ep} | {b} | {f['layer_ms']:.3f} | {g['layer_ms']:.3f} | "
                          f"{f['layer_ms'] / g['layer_ms']:.2f}x |")
    md += [""] + [f"- EP={ep}: allgather is faster (by more than {100 * a.crossover_margin:g}%) up to "
                  f"**{c[0]} tokens/rank**"
                  + (" (at every batch swept)" if c[1] else "") for ep, c in cross.items()]
    md += [f"- crossover used for `MoEConfig.allgather_max_tokens` (the smaller over EP sizes): **{chosen}** "
           f"(current default: {report['allgather_max_tokens_default']})", "",
           "Target (batch 1-8 per rank: best mode's MoE-layer latency >= 1.3x lower than flat's):"]
    for key, t in target.items():
        md.append(f"- {key}: best `{t['best_mode']}` {t['best_layer_ms']:.3f} ms vs flat {t['flat_layer_ms']:.3f} ms "
                  f"= {t['flat_over_best']:.2f}x ({'met' if t['met'] else 'missed'})")
    md += ["", f"Load average at the end: {environment()['hardware'].get('load_average_1_5_15')} (a shared "
           "2-core machine: EP ranks and other jobs compete for the cores, so exchange latencies include "
           "scheduling delays)."]

    def plot(plt) -> None:
        fig, axes = plt.subplots(1, len(eps), figsize=(6 * len(eps), 4), squeeze=False)
        for ax, ep in zip(axes[0], eps):
            for mode in ("flat", "allgather"):
                pts = sorted((r for r in rows if r["ep"] == ep and r["mode"] == mode), key=lambda r: r["batch"])
                ax.plot([r["batch"] for r in pts], [r["layer_ms"] for r in pts], marker="o", label=mode)
            for mode in [m for m in MODES if m not in ("flat", "allgather")]:
                pts = sorted((r for r in rows if r["ep"] == ep and r["mode"] == mode), key=lambda r: r["batch"])
                if pts:
                    ax.plot([r["batch"] for r in pts], [r["layer_ms"] for r in pts], marker=".", ls="--", label=mode)
            if cross.get(str(ep), (0,))[0]:
                ax.axvline(cross[str(ep)][0], color="0.5", ls=":", label="crossover")
            ax.set_xscale("log", base=2)
            ax.set(title=f"EP={ep}: MoE layer per decode token", xlabel="sequences per rank", ylabel="ms")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    return report


if __name__ == "__main__":
    main()
