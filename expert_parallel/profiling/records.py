"""Turn per-rank timer readings and routing stats into profiler records.

Each rank packs one float64 vector per layer (:func:`per_rank_vector`); the profiler
all-gathers them once per profiled step and every rank builds the same record with
:func:`build_record`. Definitions used in a record:

* ``phases[p].forward_s`` / ``backward_s``: mean over ranks of the seconds rank spent in
  phase p (backward attribution: see :mod:`expert_parallel.profiling.timer`);
  ``slowest_rank`` is the global rank with the largest forward+backward time in p and
  ``max_over_mean`` that time over the mean (straggler attribution: a rank that is slow
  in ``experts`` shows up as everyone else's long ``combine_a2a`` wait).
* ``forward_s``: mean over ranks of the layer's forward wall time (forward hooks);
  ``forward_unattributed_s`` = that minus the sum of the forward phases (Python glue,
  stats). ``backward_s`` is the sum of the backward segments by construction.
* ``a2a.<dispatch|combine>``: bytes this rank's exchange sent / received per profiled
  step (rows to itself included, as the collective moves them), and the achieved
  algorithm bandwidth ``bytes_sent / phase time`` (GB/s, 1e9 bytes). The backward
  exchange of ``dispatch`` sends what the forward dispatch received, so its GB/s is
  ``bytes_received / backward time``.
* ``tokens``: global (summed over ranks) routed / kept / dropped / capacity per expert;
  ``capacity_slack_rows`` = capacity slots - kept pairs, i.e. the rows a
  capacity-padded implementation (DeepSpeed, GShard, our ``static_shapes``) computes and
  ships for nothing; ``padding_waste_fraction`` = slack / slots; ``padding_computed`` says
  whether this layer actually pads (static shapes) or only would.
* ``imbalance``: max/mean over experts of the global routed (demand) and kept counts;
  max/mean over the ranks of an EP group of the rows each receives for its experts
  (worst EP group), i.e. the expert-compute imbalance between ranks.
* ``per_rank``: the per-rank per-expert routed and kept counts (source side), the input
  to ``benchmarks/cluster_model.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch

from .timer import A2A_PHASES, PHASES

_BWD = PHASES + ("unattributed",)
_BYTES = ("dispatch_a2a", "combine_a2a")


def _layout(num_experts: int) -> dict[str, tuple[int, int]]:
    """Name -> (offset, length) of the fields in one layer's per-rank vector."""
    sizes = [("fwd", len(PHASES)), ("fwd_total", 1), ("bwd", len(_BWD)), ("bwd_total", 1),
             ("bytes", 2 * len(_BYTES)), ("routed", num_experts), ("kept", num_experts),
             ("capacity", num_experts), ("num_tokens", 1), ("all_dropped", 1), ("calls", 1)]
    out, offset = {}, 0
    for name, size in sizes:
        out[name] = (offset, size)
        offset += size
    out["_size"] = (offset, 0)
    return out


def per_rank_vector(layer: Any, passes: dict, timer: Any, stats: Optional[Any]) -> tuple[torch.Tensor, dict]:
    """This rank's readings for one layer, as a flat float64 vector, plus constant facts."""
    cfg = layer.config
    E = cfg.num_experts
    fwd, bwd = passes["forward"], passes["backward"]
    values: list[float] = [fwd.get(p, 0.0) for p in PHASES] + [fwd.get("total", 0.0)]
    values += [bwd.get(p, 0.0) for p in _BWD] + [bwd.get("total", 0.0)]
    for name in _BYTES:
        values += [float(timer.bytes_sent.get(name, 0)), float(timer.bytes_received.get(name, 0))]
    head = torch.tensor(values, dtype=torch.float64)
    if stats is None:
        counts = torch.zeros(3 * E + 2, dtype=torch.float64)
        calls = 0
    else:
        counts = torch.cat([stats.routed_E.reshape(-1), stats.kept_E.reshape(-1),
                            stats.capacity_E.reshape(-1), stats.num_tokens.reshape(1),
                            stats.tokens_all_dropped.reshape(1)]).to("cpu", torch.float64)
        calls = int(timer.calls.get("router", 0))
    vec = torch.cat([head, counts, torch.tensor([float(calls)], dtype=torch.float64)])
    meta = {"num_experts": E, "ep_size": layer.groups.ep_size, "top_k": cfg.top_k,
            "capacity_factor": cfg.capacity_factor, "static_shapes": cfg.static_shapes,
            "size": vec.numel()}
    return vec, meta


def _max_over_mean(xs: list[float]) -> float:
    mean = sum(xs) / len(xs) if xs else 0.0
    return max(xs) / mean if mean > 0 else 0.0


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def _layer_record(rows: list[list[float]], meta: dict, ep_size: int) -> dict:
    E = meta["num_experts"]
    lay = _layout(E)
    world = len(rows)

    def field(name: str) -> list[list[float]]:
        off, size = lay[name]
        return [r[off : off + size] for r in rows]

    fwd, bwd = field("fwd"), field("bwd")
    fwd_total = [r[0] for r in field("fwd_total")]
    bwd_total = [r[0] for r in field("bwd_total")]
    phases = {}
    for i, p in enumerate(_BWD):
        f = [fwd[r][i] if i < len(PHASES) else 0.0 for r in range(world)]
        b = [bwd[r][i] for r in range(world)]
        both = [f[r] + b[r] for r in range(world)]
        phases[p] = {"forward_s": sum(f) / world, "backward_s": sum(b) / world,
                     "forward_max_s": max(f), "backward_max_s": max(b),
                     "slowest_rank": max(range(world), key=lambda r: both[r]),
                     "max_over_mean": _max_over_mean(both)}
    fwd_sum = [sum(fwd[r]) for r in range(world)]
    nbytes = field("bytes")
    a2a = {}
    for j, name in enumerate(_BYTES):
        sent = [nbytes[r][2 * j] for r in range(world)]
        recv = [nbytes[r][2 * j + 1] for r in range(world)]
        i = PHASES.index(name)
        a2a[name.split("_")[0]] = {
            "bytes_sent": sent, "bytes_received": recv,
            "forward_GBps": sum(_gbps(sent[r], fwd[r][i]) for r in range(world)) / world,
            "backward_GBps": sum(_gbps(recv[r], bwd[r][i]) for r in range(world)) / world,
        }
    routed_RE, kept_RE, cap_RE = field("routed"), field("kept"), field("capacity")
    routed_E = [sum(routed_RE[r][e] for r in range(world)) for e in range(E)]
    kept_E = [sum(kept_RE[r][e] for r in range(world)) for e in range(E)]
    cap_E = [sum(cap_RE[r][e] for r in range(world)) for e in range(E)]
    dropped_E = [a - b for a, b in zip(routed_E, kept_E)]
    slots, kept_all = sum(cap_E), sum(kept_E)
    # Rows each rank receives for its own experts, from the sources in its EP group.
    e_local = E // ep_size
    received = []
    for g in range(world):
        group = range(g - g % ep_size, g - g % ep_size + ep_size)
        mine = range((g % ep_size) * e_local, (g % ep_size + 1) * e_local)
        received.append(sum(kept_RE[s][x] for s in group for x in mine))
    ep_imbalance = max((_max_over_mean(received[s : s + ep_size]) for s in range(0, world, ep_size)),
                       default=0.0)
    num_tokens = sum(r[0] for r in field("num_tokens"))
    return {
        "phases": phases,
        "forward_s": sum(fwd_total) / world,
        "backward_s": sum(bwd_total) / world,
        "forward_phase_sum_s": sum(fwd_sum) / world,
        "forward_unattributed_s": (sum(fwd_total) - sum(fwd_sum)) / world,
        "a2a": a2a,
        "tokens": {
            "num_tokens": int(num_tokens),
            "routed_E": [int(v) for v in routed_E], "kept_E": [int(v) for v in kept_E],
            "dropped_E": [int(v) for v in dropped_E], "capacity_E": [int(v) for v in cap_E],
            "drop_fraction": sum(dropped_E) / sum(routed_E) if sum(routed_E) else 0.0,
            "tokens_all_dropped": int(sum(r[0] for r in field("all_dropped"))),
            "capacity_slack_rows": int(slots - kept_all),
            "padding_waste_fraction": (slots - kept_all) / slots if slots else 0.0,
            "padding_computed": bool(meta["static_shapes"]),
        },
        "imbalance": {
            "experts_routed_max_over_mean": _max_over_mean(routed_E),
            "experts_kept_max_over_mean": _max_over_mean(kept_E),
            "ep_ranks_received_max_over_mean": ep_imbalance,
            "received_rows_per_rank": [int(v) for v in received],
        },
        "per_rank": {
            "routed_RE": [[int(v) for v in row] for row in routed_RE],
            "kept_RE": [[int(v) for v in row] for row in kept_RE],
            "forward_s": fwd_total, "backward_s": bwd_total,
            "phase_sum_s": [fwd_sum[r] + bwd_total[r] for r in range(world)],
        },
        "config": {k: meta[k] for k in ("num_experts", "ep_size", "top_k", "capacity_factor",
                                        "static_shapes")},
        "forward_calls": int(sum(r[0] for r in field("calls")) / world),
    }


def build_record(step: int, table: list[list[float]], meta: dict, layers: dict, groups: Any) -> dict:
    """The record of one profiled step from the gathered ``table`` ([rank][feature])."""
    world = len(table)
    layer_recs, offset = {}, 0
    a2a_r = [0.0] * world
    moe_r = [0.0] * world
    for name in layers:
        size = meta[name]["size"]
        rows = [r[offset : offset + size] for r in table]
        offset += size
        rec = _layer_record(rows, meta[name], meta[name]["ep_size"])
        layer_recs[name] = rec
        lay = _layout(meta[name]["num_experts"])
        for r in range(world):
            f_off, b_off = lay["fwd"][0], lay["bwd"][0]
            for p in A2A_PHASES:
                i = PHASES.index(p)
                a2a_r[r] += rows[r][f_off + i] + rows[r][b_off + i]
            moe_r[r] += rows[r][lay["fwd_total"][0]] + rows[r][lay["bwd_total"][0]]
    step_r = [r[offset] for r in table]
    shares = [a / s for a, s in zip(a2a_r, step_r) if s > 0]
    return {
        "step": int(step),
        "world_size": world,
        "ep_size": int(groups.ep_size),
        "step_time_s": max(step_r),
        "a2a_time_s": sum(a2a_r) / world,
        "moe_time_s": sum(moe_r) / world,
        "a2a_share": sum(shares) / len(shares) if shares else None,
        "moe_share": (sum(m / s for m, s in zip(moe_r, step_r) if s > 0) / len(shares)) if shares else None,
        "layers": layer_recs,
    }


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """Flat ``{tag: value}`` of the headline numbers of one record."""
    out: dict[str, float] = {}
    if record.get("a2a_share") is not None:
        out["moe/a2a_share"] = record["a2a_share"]
    out["moe/a2a_time_ms"] = 1e3 * record["a2a_time_s"]
    for name, rec in record["layers"].items():
        for p, v in rec["phases"].items():
            out[f"moe/{name}/fwd_ms/{p}"] = 1e3 * v["forward_s"]
            out[f"moe/{name}/bwd_ms/{p}"] = 1e3 * v["backward_s"]
        out[f"moe/{name}/drop_fraction"] = rec["tokens"]["drop_fraction"]
        out[f"moe/{name}/padding_waste_fraction"] = rec["tokens"]["padding_waste_fraction"]
        for k, v in rec["imbalance"].items():
            if isinstance(v, float):
                out[f"moe/{name}/{k}"] = v
        for k, v in rec["a2a"].items():
            out[f"moe/{name}/{k}_fwd_GBps"] = v["forward_GBps"]
    return out


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per layer: phase times averaged over the records, plus drop/imbalance means."""
    out: dict[str, dict] = {}
    n = len(records)
    for name in records[0]["layers"]:
        recs = [r["layers"][name] for r in records]
        phases = {}
        for p in recs[0]["phases"]:
            slow = Counter(r["phases"][p]["slowest_rank"] for r in recs).most_common(1)[0][0]
            phases[p] = {k: sum(r["phases"][p][k] for r in recs) / n
                         for k in ("forward_s", "backward_s", "max_over_mean")}
            phases[p]["slowest_rank"] = slow
        out[name] = {
            "phases": phases,
            "forward_s": sum(r["forward_s"] for r in recs) / n,
            "backward_s": sum(r["backward_s"] for r in recs) / n,
            "forward_unattributed_s": sum(r["forward_unattributed_s"] for r in recs) / n,
            "drop_fraction": sum(r["tokens"]["drop_fraction"] for r in recs) / n,
            "padding_waste_fraction": sum(r["tokens"]["padding_waste_fraction"] for r in recs) / n,
            "experts_max_over_mean": sum(r["imbalance"]["experts_routed_max_over_mean"] for r in recs) / n,
            "ep_ranks_max_over_mean": sum(r["imbalance"]["ep_ranks_received_max_over_mean"] for r in recs) / n,
            "dispatch_fwd_GBps": sum(r["a2a"]["dispatch"]["forward_GBps"] for r in recs) / n,
            "combine_fwd_GBps": sum(r["a2a"]["combine"]["forward_GBps"] for r in recs) / n,
        }
    return out


def markdown_table(records: list[dict]) -> str:
    """A markdown report of the profiled window: one phase table per layer."""
    if not records:
        return "(no profiled steps)"
    shares = [r["a2a_share"] for r in records if r["a2a_share"] is not None]
    lines = [f"# MoE profile: steps {records[0]['step']}..{records[-1]['step']} "
             f"({len(records)} profiled, world {records[0]['world_size']}, EP {records[0]['ep_size']})", ""]
    if shares:
        lines.append(f"Share of step time in all-to-all (count exchange + dispatch + combine, "
                     f"fwd+bwd): **{100 * sum(shares) / len(shares):.1f}%**")
        lines.append("")
    for name, s in summarize(records).items():
        total = s["forward_s"] + s["backward_s"]
        lines += [f"## {name}", "",
                  "| phase | fwd ms | bwd ms | share of layer | slowest rank | max/mean over ranks |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p, v in s["phases"].items():
            t = v["forward_s"] + v["backward_s"]
            lines.append(f"| {p} | {1e3 * v['forward_s']:.3f} | {1e3 * v['backward_s']:.3f} | "
                         f"{100 * t / total if total else 0:.1f}% | {v['slowest_rank']} | "
                         f"{v['max_over_mean']:.2f} |")
        lines.append(f"| (forward glue, unattributed) | {1e3 * s['forward_unattributed_s']:.3f} | | | | |")
        lines.append(f"| **layer total** | {1e3 * s['forward_s']:.3f} | {1e3 * s['backward_s']:.3f} | 100% | | |")
        lines += ["", f"drop fraction {100 * s['drop_fraction']:.2f}%, capacity padding waste "
                  f"{100 * s['padding_waste_fraction']:.1f}%, load max/mean: experts "
                  f"{s['experts_max_over_mean']:.2f}, EP ranks {s['ep_ranks_max_over_mean']:.2f}; "
                  f"achieved GB/s: dispatch {s['dispatch_fwd_GBps']:.2f}, combine "
                  f"{s['combine_fwd_GBps']:.2f}", ""]
    return "\n".join(lines)
